"""Triton paged attention for CUDA: cache writes, prefill and split-K decode kernels.

Importing this package imports Triton, so only `select_backend` does it, and only when asked for
the triton backend: a CPU install runs without Triton. Tests run the same kernels on the CPU under
Triton's interpreter (TRITON_INTERPRET=1, set before this package is first imported).
"""

from services.worker.kernels.triton.backend import INTERPRETED, TritonAttentionBackend

__all__ = ["INTERPRETED", "TritonAttentionBackend"]
