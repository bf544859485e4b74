"""The roofline probe, the compute floor of a workload per precision, and the llama.cpp peer's plumbing."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import llama_tools, roofline
from bench.clients import run_http
from bench.workload import random_workload

CONFIG = {"hidden_size": 8, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "vocab_size": 100}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_projection_weights_per_token_follow_the_architecture(model_dir) -> None:
    p = roofline.projection_params(model_dir)
    # head_dim 4: q 8, k 4, v 4 outputs of 8 inputs, per layer.
    assert p == {"qkv": 2 * 8 * 16, "o": 2 * 8 * 8, "gate_up": 2 * 2 * 8 * 32, "down": 2 * 32 * 8, "lm_head": 800}


def test_the_floor_charges_each_projection_at_its_own_precision(model_dir) -> None:
    probe = {"gemm_gflops": {"float32": 1.0, "int8": 4.0}}
    p = roofline.projection_params(model_dir)
    tokens = 1000
    assert roofline.floor_s(probe, model_dir, tokens, "float32") == pytest.approx(2 * sum(p.values()) * tokens / 1e9)
    mixed = 2 * tokens * (p["down"] / 1e9 + (sum(p.values()) - p["down"]) / 4e9)  # int8 keeps down in float32
    assert roofline.floor_s(probe, model_dir, tokens, "switchyard_int8") == pytest.approx(mixed)
    assert roofline.floor_s(probe, model_dir, tokens, "q4_1") == pytest.approx(2 * sum(p.values()) * tokens / 4e9)
    # bf16 widens to float32 exactly: without a faster native bf16 GEMM, float32's rate bounds it.
    assert roofline.floor_s(probe, model_dir, tokens, "bfloat16") == roofline.floor_s(probe, model_dir, tokens, "float32")
    native = {"gemm_gflops": {"float32": 1.0, "bfloat16": 2.0}}
    assert roofline.floor_s(native, model_dir, tokens, "bfloat16") == pytest.approx(sum(p.values()) * tokens / 1e9)
    assert roofline.floor_s({"gemm_gflops": {"float32": 1.0}}, model_dir, tokens, "q4_1") is None  # no int8 rate
    floor = roofline.floor_s(probe, model_dir, tokens, "float32")
    assert roofline.fraction_of_floor(probe, model_dir, tokens, "float32", 4 * floor) == pytest.approx(0.25)


def test_the_probe_measures_every_precision_and_records_the_cpu() -> None:
    probe = roofline.probe(min_s=0.05)
    assert set(probe["gemm_gflops"]) >= {"float32", "bfloat16"}
    assert all(v > 0 for v in probe["gemm_gflops"].values()) and probe["copy_gbps"] > 0
    assert {"bf16", "vnni", "amx", "model_name"} <= set(probe["cpu"])
    assert "GEMM" in roofline.describe(probe)


def test_the_llama_tools_say_what_is_missing_and_name_a_bad_kind(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SWITCHYARD_LLAMA_CPP_DIR", str(tmp_path))
    ok, why = llama_tools.available()
    assert not ok and "make bench-tools" in why and str(tmp_path) in why
    with pytest.raises(ValueError, match="kind: expected"):
        llama_tools.gguf_file("q2_k")


@pytest.mark.skipif(not llama_tools.available()[0], reason="llama-server is not built (`make bench-tools`)")
def test_llama_server_peer_streams_through_our_http_client(smollm2_model_dir) -> None:
    from bench.llama_server import llama_server  # noqa: PLC0415

    w = random_workload("peer", num_requests=2, prompt_len=(8, 16), output_len=(6, 6), vocab_size=49152,
                        concurrency=2, seed=3)
    with llama_server(llama_tools.gguf_file("bf16", smollm2_model_dir), num_threads=1, num_parallel=2,
                      ctx_per_slot=64) as url:
        records, _ = asyncio.run(run_http(url, w, label="llama-server"))
    assert [r.error for r in records] == ["", ""]
    assert [r.num_output_tokens for r in records] == [6, 6]  # ignore_eos and the usage event are honoured
