"""Runs a Hugging Face Llama-family model over a flat, paged batch.

The weights and every layer module come from transformers (loaded from safetensors, or from a
GGUF file through `shared.gguf_model`); only the
attention call is ours, so K/V go to the slots a step names and attention reads the paged blocks.
Reusing HF's own modules (norms, projections, rotary embedding, MLP) is what keeps greedy output
token-identical to `generate`. Llama, Mistral and Qwen2 share this layout; Qwen3-style q/k norms
are applied when present.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from services.worker.kernels import AttentionMetadata, select_backend
from services.worker.kv_pool import KVPool, KVPoolShape, num_blocks_for_budget
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


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {name!r}")
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
        attention_backend: str = "auto",
        max_model_len: int | None = None,
        name: str | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 (slow import)

        self.model_dir = Path(model_dir)
        torch_dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        if is_gguf_path(self.model_dir):
            gguf = GgufModel(self.model_dir)  # validates first: a bad file is one GgufError line
            self.model = gguf.hf_model(torch_dtype).to(self.device)
            config = self.model.config
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
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=torch_dtype, local_files_only=True
            ).to(self.device).eval()
            eos_token_ids = _eos_ids(config, self.model_dir)
        self._apply_rotary = sys.modules[type(self.model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb
        attn = self.model.model.layers[0].self_attn
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
        self.kv_pool = KVPool(kv_pool_shape(self.spec, block_size, num_blocks, kv_cache_bytes, torch_dtype),
                              self.device)
        self.backend = select_backend(str(self.device), attention_backend)
        self._decode_graphs = None
        # Graphs only pay off against GPU launch overhead, and only the Triton decode path is
        # capturable (the torch one copies host lists to the device every call).
        if cuda_graphs and self.device.type == "cuda" and self.backend.name == "triton":
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
        return self._forward(input_ids, positions, meta, logits_indices)

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)[None]  # HF modules expect a batch dim of 1
        cos, sin = inner.rotary_emb(hidden, positions[None])
        cos, sin = cos[0], sin[0]
        num_tokens = input_ids.shape[0]
        for layer, kv_cache in zip(inner.layers, self.kv_pool.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_proj(x).view(num_tokens, -1, attn.head_dim)
            k = attn.k_proj(x).view(num_tokens, -1, attn.head_dim)
            v = attn.v_proj(x).view(num_tokens, -1, attn.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self._apply_rotary(q, k, cos, sin, unsqueeze_dim=1)
            self.backend.write_kv(k, v, kv_cache, meta.slot_mapping)
            out = self.backend.attention(q, kv_cache, meta, attn.scaling)
            hidden = residual + attn.o_proj(out.reshape(1, num_tokens, -1))
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = inner.norm(hidden)
        return self.model.lm_head(hidden[0, logits_indices]).float()
