"""Paged attention behind one interface.

The worker's model code calls only `AttentionBackend.write_kv` and `AttentionBackend.attention`;
which implementation runs is decided once, at start (`select_backend`). The torch backend is the
reference every other backend is tested against, and the CPU path.
"""

from services.worker.kernels.interface import AttentionBackend, AttentionMetadata, build_metadata
from services.worker.kernels.torch_backend import TorchAttentionBackend


def select_backend(device: str, name: str = "auto") -> AttentionBackend:
    """Returns the backend called `name`; "auto" picks Triton on CUDA and torch elsewhere."""
    if name == "auto":
        name = "triton" if str(device).startswith("cuda") else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        try:
            from services.worker.kernels.triton import TritonAttentionBackend  # noqa: PLC0415
        except ImportError as e:  # keeps CPU installs free of a hard Triton dependency
            raise ValueError(f"attention_backend: triton is not available here ({e})") from e
        return TritonAttentionBackend(device)
    raise ValueError(f"attention_backend: expected auto, torch or triton, got {name!r}")


__all__ = ["AttentionBackend", "AttentionMetadata", "build_metadata", "select_backend"]
