"""`--dtype auto` and `--quantization`: what the worker resolves them to, and the errors it gives."""

from __future__ import annotations

import pytest

from services.worker.config import parse_config
from services.worker.model_runner import ModelRunner, resolve_dtype
from shared.cpu_features import cpu_features


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch) -> None:
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_features().bf16 else "float32")
    assert resolve_dtype("float32", "cpu") == "float32"  # an explicit dtype is kept
    with pytest.raises(ValueError, match="dtype: expected one of"):
        resolve_dtype("float8", "cpu")


def test_worker_flags_default_to_auto_and_no_quantization(monkeypatch) -> None:
    monkeypatch.delenv("SWITCHYARD_DTYPE", raising=False)
    config = parse_config([])
    assert (config.dtype, config.quantization, config.num_threads) == ("auto", "none", 0)
    assert parse_config(["--quantization", "int8"]).quantization == "int8"
    with pytest.raises(SystemExit):
        parse_config(["--quantization", "int4"])


def test_a_bad_quantization_is_refused_by_name(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="quantization: expected one of"):
        ModelRunner(tiny_model_dir, quantization="fp4", num_blocks=4)


def test_int8_runs_on_the_tiny_model_and_reports_its_dtype(tiny_model_dir) -> None:
    runner = ModelRunner(tiny_model_dir, quantization="int8", num_blocks=8, dtype="auto")
    assert runner.spec.dtype == resolve_dtype("auto", "cpu")
