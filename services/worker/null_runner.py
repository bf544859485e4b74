"""A stand-in for `ModelRunner` that computes nothing: it measures the pipeline alone.

`NullModelRunner` has every attribute the Executor, the servicer and the worker's metrics read
(`spec`, `block_size`, `num_blocks`, `kv_pool.is_valid_block`, `device`, `backend.name`), with the
spec read from the model's `config.json` (and `generation_config.json`), so vocabulary size,
`max_model_len`, EOS ids and the default number of KV blocks are those of the real model and the
scheduler batches exactly as it would. No weights are loaded and no KV memory is allocated.

`forward` returns float32 logits whose argmax is `(input token + 1) % vocab_size` for each row asked
for, so greedy decoding is deterministic and checkable: a request whose last prompt token is `t`
generates `t+1, t+2, ...`. Everything around the model still runs (step validation, metadata,
sampler, wire conversion, scheduling), which is what `--null-model` is for: the cost of the
services with the model's cost taken out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from services.worker.kernels import AttentionMetadata
from services.worker.kv_pool import NULL_BLOCK_ID, KVPoolShape, check_block_copies, num_host_blocks_for_budget
from services.worker.model_runner import ModelSpec, _eos_ids, kv_pool_shape, parse_dtype, resolve_dtype
from shared.gguf_model import is_gguf_path

NULL_LOGIT = 1.0e4  # the chosen token's logit; every other logit is 0


@dataclass(frozen=True)
class NullBackend:
    name: str = "null"


class NullKVPool:
    """The shape of the pool the real model would have, without its tensors."""

    def __init__(self, shape: KVPoolShape, num_host_blocks: int = 0) -> None:
        self.shape = shape
        self.num_host_blocks = num_host_blocks  # the scheduler's host tier works the same; copies move nothing
        self.layers: list[torch.Tensor] = []

    def check_copies(self, copies_to_host: Sequence[tuple[int, int]],
                     copies_to_device: Sequence[tuple[int, int]]) -> None:
        check_block_copies(self.shape.num_blocks, self.num_host_blocks, copies_to_host, copies_to_device)

    def copy_to_host(self, copies: object) -> None:
        """Nothing to copy: there is no KV."""

    def copy_to_device(self, copies: object) -> None:
        """Nothing to copy: there is no KV."""

    def is_valid_block(self, block_id: int) -> bool:
        return NULL_BLOCK_ID < block_id < self.shape.num_blocks

    def clear_blocks(self, block_ids: object) -> None:
        """Nothing to clear: there is no KV."""


def next_token(token_id: int, vocab_size: int) -> int:
    """The token the null model picks after `token_id` (greedy)."""
    return (token_id + 1) % vocab_size


class NullModelRunner:
    """Same interface as `ModelRunner`; the forward pass is one scatter into a zero tensor."""

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
        max_model_len: int | None = None,
        name: str | None = None,
        **_ignored: object,  # attention_backend and any other ModelRunner knob: nothing to choose here
    ) -> None:
        self.model_dir = Path(model_dir)
        config_path = self.model_dir / "config.json"
        if is_gguf_path(self.model_dir):
            raise ValueError(f"model: {self.model_dir}: the null model reads a model directory, not a GGUF "
                             "file (convert it with `python -m services.worker.make_model --gguf FILE`)")
        if not config_path.exists():
            raise FileNotFoundError(f"model: {self.model_dir} has no config.json (run `make model`?)")
        raw = json.loads(config_path.read_text())
        text = raw.get("text_config", raw)  # multimodal configs nest the language model's
        dtype = resolve_dtype(dtype, device)
        torch_dtype = parse_dtype(dtype)
        num_heads = int(text["num_attention_heads"])
        head_dim = text.get("head_dim") or int(text["hidden_size"]) // num_heads
        limit = int(text.get("max_position_embeddings", 2048))
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len: {max_model_len} exceeds the model's {limit}")
        config = SimpleNamespace(eos_token_id=text.get("eos_token_id", raw.get("eos_token_id")))
        self.spec = ModelSpec(
            name=name or self.model_dir.name,
            model_type=str(raw.get("model_type", text.get("model_type", "unknown"))),
            dtype=dtype,
            vocab_size=int(text["vocab_size"]),
            max_model_len=max_model_len or limit,
            eos_token_ids=_eos_ids(config, self.model_dir),
            num_layers=int(text["num_hidden_layers"]),
            num_kv_heads=int(text.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
        )
        shape = kv_pool_shape(self.spec, block_size, num_blocks, kv_cache_bytes, torch_dtype)
        self.kv_pool = NullKVPool(shape, num_host_blocks_for_budget(kv_host_cache_bytes, shape))
        self.device = torch.device(device)
        self.backend = NullBackend()

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
        """float32 `[len(logits_indices), vocab]`: zeros, and NULL_LOGIT at `(input token + 1) % vocab`."""
        vocab_size = self.spec.vocab_size
        chosen = (input_ids.index_select(0, logits_indices) + 1).remainder_(vocab_size)
        logits = torch.zeros(chosen.shape[0], vocab_size, dtype=torch.float32, device=self.device)
        logits.scatter_(1, chosen.unsqueeze(1), NULL_LOGIT)
        return logits
