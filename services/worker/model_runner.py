"""Runs a Hugging Face Llama-family model over a flat, paged batch.

transformers loads the weights (from safetensors, or from a GGUF file through
`shared.gguf_model`); `services.worker.llama.LlamaModel` fuses them and runs the forward pass, so
K/V go to the slots a step names and attention reads the paged blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from services.worker.calibration import activation_absmax, calibration_ids
from services.worker.kernels import AttentionMetadata, select_backend
from services.worker.linear import QUANTIZATIONS
from services.worker.llama import LlamaModel
from services.worker import pipeline
from services.worker.kv_pool import KVPool, KVPoolShape, num_blocks_for_budget, num_host_blocks_for_budget
from services.worker.parallel import Layout, LeaderKVPool, send_forward, shard_spec, stage_layers
from shared.cpu_features import cpu_features
from shared.gguf_model import GgufModel, is_gguf_path, served_model_name

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the system needs to know about the loaded model."""

    name: str
    model_type: str
    dtype: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int


DTYPE_CHOICES = ("auto", *_DTYPES)


def resolve_dtype(name: str, device: str) -> str:
    """`auto` is the fastest dtype the device computes in natively, else the name as given.

    CPU: bfloat16 only with native bf16 dot products (AVX512-BF16 or AMX); without them torch
    emulates bf16 GEMMs at a quarter of float32's speed or worse (measured on an AVX2 EPYC), so
    float32, which is also the dtype that matches Hugging Face token for token. CUDA: bfloat16
    where supported, else float16.
    """
    if name != "auto":
        parse_dtype(name)
        return name
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    if torch.device(device).type == "cpu" and cpu_features().bf16:
        return "bfloat16"
    return "float32"


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPE_CHOICES)}, got {name!r}")
    return _DTYPES[name]


def _eos_ids(config: object, model_dir: Path) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def kv_pool_shape(spec: ModelSpec, block_size: int, num_blocks: int | None, kv_cache_bytes: int | None,
                  dtype: torch.dtype) -> KVPoolShape:
    """The KV pool for `spec`: `num_blocks` if given, else as many as `kv_cache_bytes` (256 MiB) hold,
    and never fewer than one request of `max_model_len` tokens needs.

    Without that floor a request the model accepts could be refused for want of KV space: a chat
    request with no max_tokens asks for the whole context (8,192 tokens for SmolLM2, 377 MiB of
    float32 KV, more than the default budget). An explicit `num_blocks` is taken as it is."""
    if num_blocks is None:
        num_blocks = num_blocks_for_budget(
            kv_cache_bytes or 256 * 2**20, num_layers=spec.num_layers, block_size=block_size,
            num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=dtype,
        )
        num_blocks = max(num_blocks, -(-spec.max_model_len // block_size) + 1)  # + the null block
    if num_blocks < 2:
        raise ValueError(f"num_blocks: need at least 2 (one is the null block), got {num_blocks}")
    return KVPoolShape(spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim, dtype)


class ModelRunner:
    """Owns the model, its KV pool and the attention backend; runs one forward pass per step."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        kv_host_cache_bytes: int = 0,
        attention_backend: str = "auto",
        max_model_len: int | None = None,
        name: str | None = None,
        cuda_graphs: bool = True,
        quantization: str = "none",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        parallel_rank: int = 0,
    ) -> None:
        """With more than one rank (`tensor_parallel_size` x `pipeline_parallel_size`) the process
        group must already be joined (parallel.init_group); this process is `parallel_rank`, and rank
        0 broadcasts each KV change and forward pass to the others."""
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 (slow import)

        self.model_dir = Path(model_dir)
        dtype = resolve_dtype(dtype, device)
        torch_dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
        if is_gguf_path(self.model_dir):
            gguf = GgufModel(self.model_dir)  # validates first: a bad file is one GgufError line
            hf_model = gguf.hf_model(torch_dtype).to(self.device)
            config = hf_model.config
            eos_token_ids = gguf.config.eos_token_ids
        else:
            if not (self.model_dir / "config.json").exists():
                raise FileNotFoundError(f"model: {self.model_dir} has no config.json (run `make model`?)")
            config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
            if config.model_type not in SUPPORTED_MODEL_TYPES:
                raise ValueError(
                    f"model: architecture {config.model_type!r} is not supported; "
                    f"expected one of {SUPPORTED_MODEL_TYPES}"
                )
            hf_model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=torch_dtype, local_files_only=True
            ).to(self.device).eval()
            eos_token_ids = _eos_ids(config, self.model_dir)
        attn = hf_model.model.layers[0].self_attn
        num_kv_heads = config.num_key_value_heads
        limit = int(config.max_position_embeddings)
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len: {max_model_len} exceeds the model's {limit}")
        self.spec = ModelSpec(
            name=name or served_model_name(self.model_dir),
            model_type=config.model_type,
            dtype=dtype,
            vocab_size=int(config.vocab_size),
            max_model_len=max_model_len or limit,
            eos_token_ids=eos_token_ids,
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=int(num_kv_heads),
            head_dim=int(attn.head_dim),
        )
        act_absmax = None
        if quantization == "int8":  # SmoothQuant's activation ranges, from the float model
            act_absmax = activation_absmax(hf_model, calibration_ids(self.model_dir))
        # Our fused forward takes the weights; HF's modules are not kept (int8 would double them).
        self.layout = Layout(tensor_parallel_size, pipeline_parallel_size, parallel_rank)
        shard = None
        if tensor_parallel_size > 1:
            shard = shard_spec(self.layout.tp_rank, tensor_parallel_size, int(config.num_attention_heads),
                               int(num_kv_heads), int(config.intermediate_size))
        layers = stage_layers(self.spec.num_layers, pipeline_parallel_size, self.layout.stage)
        self.model = LlamaModel(hf_model, max_model_len=self.spec.max_model_len, quantization=quantization,
                                act_absmax=act_absmax, shard=shard, layer_range=layers)
        del hf_model
        # Each rank holds the KV of its heads and its stage's layers; equal shares, so the same
        # budget gives every rank the same block count and one block id means the same everywhere.
        local = replace(self.spec, num_layers=len(layers),
                        num_kv_heads=shard.num_kv_heads if shard is not None else self.spec.num_kv_heads)
        shape = kv_pool_shape(local, block_size, num_blocks, kv_cache_bytes, torch_dtype)
        self.kv_pool = KVPool(shape, self.device, num_host_blocks_for_budget(kv_host_cache_bytes, shape))
        if self.layout.world_size > 1 and parallel_rank == 0:
            self.kv_pool = LeaderKVPool(self.kv_pool)
        self.backend = select_backend(str(self.device), attention_backend)
        self._decode_graphs = None
        # Graphs only pay off against GPU launch overhead, and only the Triton decode path is
        # capturable (the torch one copies host lists to the device every call).
        # A replayed graph would skip the broadcast to the other ranks: one rank only.
        if cuda_graphs and self.device.type == "cuda" and self.backend.name == "triton" and self.layout.world_size == 1:
            from services.worker.kernels.triton.graphs import DecodeGraphs  # noqa: PLC0415 (CUDA only)

            self._decode_graphs = DecodeGraphs(self._forward, device=self.device, max_model_len=self.spec.max_model_len,
                                               block_size=block_size)
            with torch.inference_mode():
                self._decode_graphs.capture()

    @property
    def block_size(self) -> int:
        return self.kv_pool.shape.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_pool.shape.num_blocks

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Computes the flat batch and returns float32 logits for the rows in `logits_indices`."""
        if self._decode_graphs is not None and self._decode_graphs.can_run(input_ids, meta):
            return self._decode_graphs.run(input_ids, positions, meta, logits_indices)
        layout = self.layout
        if layout.world_size > 1 and layout.rank == 0:
            send_forward(input_ids, positions, meta, logits_indices)
        if layout.pipeline_parallel_size > 1:
            return pipeline.forward(self.model, layout, input_ids, positions, meta, logits_indices,
                                    self.kv_pool.layers, self.backend, self.block_size)
        if layout.rank != 0:  # only rank 0 samples: the other TP ranks skip the head
            logits_indices = logits_indices[:0]
        return self._forward(input_ids, positions, meta, logits_indices)

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        return self.model.forward(input_ids, positions, meta, logits_indices, self.kv_pool.layers, self.backend)
