"""The Triton attention backend: the kernels behind the `AttentionBackend` interface.

Same semantics as `TorchAttentionBackend` on the same `AttentionMetadata`: requests with one
scheduled token go to the decode kernel, requests with more to the prefill kernel, both in one
step's flat batch. A pure decode batch (the common case, and the one CUDA graphs capture) touches
only device tensors from the metadata plus host integers, so it needs no host-to-device copy and
no synchronisation; a mixed batch builds its two request-index tensors once per step (all layers
share the step's metadata object) and reuses them in every layer.
"""

from __future__ import annotations

import torch
import triton

from services.worker.kernels.interface import AttentionMetadata
from services.worker.kernels.triton.cache_write import write_kv
from services.worker.kernels.triton.decode import _decode_kernel, decode_attention, decode_num_splits
from services.worker.kernels.triton.prefill import prefill_attention
from services.worker.kernels.triton.tiles import DotConfig, dot_config

# The kernels were decorated (at import) either for the GPU or for Triton's CPU interpreter, which
# TRITON_INTERPRET=1 selects; the interpreter is for tests, hundreds of times slower than torch.
INTERPRETED = not isinstance(_decode_kernel, triton.runtime.JITFunction)


class _StepPlan:
    """Which requests of a mixed batch go to which kernel, as device index tensors."""

    def __init__(self, meta: AttentionMetadata, device: torch.device) -> None:
        self.meta = meta  # held so the identity check in `_plan` cannot match a recycled id
        decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
        prefill = [i for i, n in enumerate(meta.query_lens) if n > 1]
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.int64, device=device)  # noqa: E731
        self.decode_ids = as_tensor(decode) if decode else None
        self.num_decode = len(decode)
        self.decode_max_seq_len = max((meta.seq_lens_host[i] for i in decode), default=0)
        self.prefill_ids = as_tensor(prefill) if prefill else None
        self.prefill_max_query_len = max((meta.query_lens[i] for i in prefill), default=0)


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, device: str | torch.device = "cuda", *, num_splits: int | None = None,
                 tile_n: int | None = None) -> None:
        """`num_splits` fixes the decode split count (default: chosen per batch from its size and
        longest context); `tile_n` overrides the key tile (tests use it to cross tile edges)."""
        device = torch.device(device)
        if device.type != "cuda" and not INTERPRETED:
            raise ValueError(
                f"attention_backend: triton needs a CUDA device, got {device} "
                "(TRITON_INTERPRET=1 runs the kernels on the CPU, for tests only)")
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits: must be >= 1, got {num_splits}")
        if tile_n is not None and (tile_n < 16 or tile_n & (tile_n - 1)):
            raise ValueError(f"tile_n: must be a power of two >= 16, got {tile_n}")
        self.device = device
        self.num_splits = num_splits
        self.tile_n = tile_n
        # SM count sizes split-K; the interpreter has no SMs, and tests fix num_splits anyway.
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 8)
        self._dot: dict[torch.dtype, DotConfig] = {}
        self._last_plan: _StepPlan | None = None

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        write_kv(key, value, kv_cache, slot_mapping)

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        if query.shape[0] == 0:
            return out
        if query.shape[1] % kv_cache.shape[3]:
            raise ValueError(f"attention: {query.shape[1]} query heads are not a multiple of "
                             f"{kv_cache.shape[3]} KV heads")
        if query.stride(-1) != 1 or kv_cache.stride(-1) != 1:
            raise ValueError("attention: query and kv_cache need a contiguous last (head_dim) axis")
        dot = self._dot_config(query.dtype)
        num_kv_heads = kv_cache.shape[3]
        if meta.is_pure_decode:
            splits = self._splits(meta.num_reqs, num_kv_heads, meta.max_seq_len)
            decode_attention(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, None,
                             meta.num_reqs, splits, scale, out, dot)
            return out
        plan = self._plan(meta, query.device)
        if plan.decode_ids is not None:
            splits = self._splits(plan.num_decode, num_kv_heads, plan.decode_max_seq_len)
            decode_attention(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                             plan.decode_ids, plan.num_decode, splits, scale, out, dot)
        if plan.prefill_ids is not None:
            prefill_attention(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              plan.prefill_ids, plan.prefill_max_query_len, scale, out, dot)
        return out

    def _splits(self, num_reqs: int, num_kv_heads: int, max_seq_len: int) -> int:
        if self.num_splits is not None:
            return self.num_splits
        return decode_num_splits(num_reqs, num_kv_heads, max_seq_len, self.num_sms)

    def _plan(self, meta: AttentionMetadata, device: torch.device) -> _StepPlan:
        if self._last_plan is None or self._last_plan.meta is not meta:
            self._last_plan = _StepPlan(meta, device)
        return self._last_plan

    def _dot_config(self, dtype: torch.dtype) -> DotConfig:
        if dtype not in self._dot:
            config = dot_config(dtype, INTERPRETED)
            if self.tile_n is not None:
                config = DotConfig(config.dtype, config.precision, self.tile_n, config.num_warps)
            self._dot[dtype] = config
        return self._dot[dtype]
