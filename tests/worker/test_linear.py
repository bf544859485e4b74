"""The projections: int8 weights with per-channel scales, SmoothQuant factors, and the CPU kernel choice."""

from __future__ import annotations

import pytest
import torch

from services.worker import linear
from services.worker.linear import (
    DynamicInt8Linear, FloatLinear, WeightOnlyInt8Linear, int8_per_channel, make_linear, smoothing_scales,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=g) * torch.linspace(0.1, 2.0, 96)[:, None]  # rows of different range
    return weight, torch.randn(96, generator=g), torch.randn(5, 64, generator=g)


@pytest.mark.parametrize("qmax", [127, 63])
def test_per_channel_int8_keeps_each_row_within_half_a_step(layer, qmax) -> None:
    weight = layer[0]
    q, scales = int8_per_channel(weight, qmax)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    assert int(q.abs().max()) == qmax  # each row's largest entry uses the whole range
    assert torch.all((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-6)


def test_weight_only_int8_is_the_dequantized_float_product(layer) -> None:
    weight, bias, x = layer
    q, scales = int8_per_channel(weight)
    expected = x @ (q.float() * scales[:, None]).T + bias
    torch.testing.assert_close(WeightOnlyInt8Linear(weight, bias)(x), expected, rtol=1e-5, atol=1e-5)
    assert rel_err(WeightOnlyInt8Linear(weight, bias)(x), FloatLinear(weight, bias)(x)) < 0.01


@pytest.mark.skipif(not linear.dynamic_int8_available(), reason="torch has no fbgemm/x86 quantized engine here")
@pytest.mark.parametrize("num_tokens", [1, 5, 300])
def test_dynamic_int8_matches_float_closely(num_tokens) -> None:
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(256, 576, generator=g) * 0.05, torch.randn(256, generator=g)
    x = torch.randn(num_tokens, 576, generator=g)
    got, want = DynamicInt8Linear(weight, bias)(x), FloatLinear(weight, bias)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    # Saturating int16 sums (8-bit weights without VNNI) give errors of order 1, not 1%.
    assert rel_err(got, want) < 0.02
    assert DynamicInt8Linear(weight, bias)(x.bfloat16()).dtype == torch.bfloat16


def test_smoothing_moves_range_from_activations_to_weights_without_changing_the_product(layer) -> None:
    weight, _, x = layer
    x[:, 3] *= 50  # an outlier channel, as RMSNorm outputs have
    s = smoothing_scales(x.abs().amax(dim=0), weight)
    assert s.shape == (64,) and bool(torch.all(s > 0))
    torch.testing.assert_close((x / s) @ (weight * s).T, x @ weight.T, rtol=1e-4, atol=1e-3)
    assert float((x / s).abs().amax(dim=0).max()) < float(x.abs().amax(dim=0).max()) / 5
    smoothed = DynamicInt8Linear(weight * s, None) if linear.dynamic_int8_available() else WeightOnlyInt8Linear(weight * s, None)
    plain = DynamicInt8Linear(weight, None) if linear.dynamic_int8_available() else WeightOnlyInt8Linear(weight, None)
    assert rel_err(smoothed(x / s), x @ weight.T) < rel_err(plain(x), x @ weight.T)


def test_make_linear_picks_a_kernel_and_names_a_bad_quantization(layer) -> None:
    weight, bias, _ = layer
    assert isinstance(make_linear(weight, bias, "none"), FloatLinear)
    expected = DynamicInt8Linear if linear.dynamic_int8_available() else WeightOnlyInt8Linear
    assert isinstance(make_linear(weight, bias, "int8"), expected)
    with pytest.raises(ValueError, match="quantization: expected one of"):
        make_linear(weight, bias, "int4")
