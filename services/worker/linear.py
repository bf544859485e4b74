"""The projections of the worker's model: float weights, or int8 weights with per-channel scales.

`make_linear` is the one place that decides how a weight matrix is stored and multiplied:

- `FloatLinear`: `F.linear` in the model's dtype (float32 keeps exact parity with Hugging Face).
- `DynamicInt8Linear` (CPU): int8 weights, one scale per output channel, packed once for fbgemm;
  each call quantizes the activations per tensor to uint8 and runs an int8 GEMM with int32
  accumulation (`quantized::linear_dynamic`). Without VNNI, fbgemm multiplies with `vpmaddubsw`,
  which adds two u8*s8 products into a *saturating* int16: 8-bit weights against 8-bit
  activations overflow and the output is garbage. Weights then keep 7 bits (|q| <= 63), which
  measured far better than the other fix, 7-bit activations (perplexity 118 vs 205 for
  all-int8 SmolLM2-135M on a text where float32 gives 71). With VNNI the products accumulate in
  int32 and the weights get all 8 bits. Measured here on an AVX2 EPYC (2 threads): 5x float32 at one
  token (it moves a quarter of the bytes) and about float32's speed on large prefill chunks.
  torch's weight-only `_weight_int8pack_mm` took 10x *longer* than float32 on that machine, and
  bf16 GEMMs without native bf16 are 4-7x slower than float32, so neither is used on such CPUs.
- `WeightOnlyInt8Linear` (other devices, e.g. CUDA): the same int8 weights and scales,
  dequantized on the fly; it saves memory, not time, and is the reference the CPU path matches.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
import torch.nn.functional as F

from shared.cpu_features import cpu_has

QUANTIZATIONS = ("none", "int8")


class Linear(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class FloatLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def int8_per_channel(weight: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows (|q| <= qmax) and their float32 scales: `weight ~= q * scale[:, None]`."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / qmax).clamp_min(1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scales


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors `s`: the layer computes `(x / s) @ (W * s)^T`.

    A few input channels of a norm's output carry activations 10-100x the rest; one scale per
    token would spend the int8 range on them. Dividing those channels by `s` (folded into the
    norm's weight, so it costs nothing at run time) and multiplying the weight's columns by `s`
    moves the range into the weights, which have a scale per row. alpha=0.6 measured best for
    SmolLM2-135M (perplexity +1.6% and +2.4% on two texts; 0.5: +3.9%, 0.7: +4.3%).
    """
    w_absmax = weight.float().abs().amax(dim=0).clamp_min(1e-5)
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp_min(1e-5)


class WeightOnlyInt8Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.qweight, self.scales = int8_per_channel(weight)
        self.qweight, self.scales = self.qweight.to(weight.device), self.scales.to(weight.device)
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x @ (q * s)^T == (x @ q^T) * s: the scale is per output column.
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias


class DynamicInt8Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        q, scales = int8_per_channel(weight, 127 if cpu_has("avx512_vnni") else 63)
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # quantized tensor constructors are deprecated, not gone
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                q, scales.double(), torch.zeros(len(scales), dtype=torch.int64), 0)
            self.packed = torch.ops.quantized.linear_prepack(
                qweight, None if bias is None else bias.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: the activations get all 8 bits (the weights are what fit the kernel).
        if x.dtype == torch.float32:
            return torch.ops.quantized.linear_dynamic(x, self.packed, False)
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False).to(x.dtype)


def dynamic_int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str) -> Linear:
    """The projection `y = x @ weight^T + bias` stored as `quantization` asks ("none" or "int8")."""
    if quantization == "none":
        return FloatLinear(weight, bias)
    if quantization != "int8":
        raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    if weight.device.type == "cpu" and dynamic_int8_available():
        return DynamicInt8Linear(weight, bias)
    return WeightOnlyInt8Linear(weight, bias)
