"""The benchmark harness still runs end to end: `python -m bench.run --quick` for three scenarios
(stack vs in-process engine, null-model TTFT, shared-prefix routing) writes every result file with
sane numbers. It checks no speed target: benchmarks measure, tests check behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.stack import REPO_ROOT

# Each runs a benchmark scenario in quick mode (minutes in all): `make test-bench`, which CI runs,
# rather than the everyday `make test`.
pytestmark = [pytest.mark.e2e, pytest.mark.bench]

SCENARIOS = ("tiny_stack_vs_engine", "null_ttft", "shared_prefix")
REQUIRED_RUNS = {"tiny_stack_vs_engine": {"stack", "in_process"}, "null_ttft": {"stack", "in_process"},
                 "shared_prefix": {"cache_aware", "round_robin"}}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", "b,c,d", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench.run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, json.loads((out / "latest.json").read_text())


def test_writes_every_file(results: tuple[Path, dict]) -> None:
    out, _ = results
    for name in ("throughput_vs_concurrency.png", "ttft_cdf.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    markdown = (out / "latest.md").read_text()
    assert "## Targets" in markdown
    for name in SCENARIOS:
        assert f"## {name}" in markdown


def test_records_the_machine(results: tuple[Path, dict]) -> None:
    _, data = results
    machine = data["machine"]
    assert data["quick"] is True
    assert machine["num_cores"] >= 1 and machine["torch_version"] and machine["python"] and machine["cpu_model"]


def test_every_scenario_ran_with_sane_numbers(results: tuple[Path, dict]) -> None:
    _, data = results
    scenarios = {s["name"]: s for s in data["scenarios"]}
    assert tuple(scenarios) == SCENARIOS
    for name, scenario in scenarios.items():
        assert scenario["error"] == "", (name, scenario["error"])
        assert REQUIRED_RUNS[name] <= set(scenario["runs"]), (name, scenario["skipped"])
        workload = scenario["config"]["workload"]
        output_len = workload["output_len"]  # quick mode: fixed lengths, a [low, high] pair or one number
        expected_tokens = workload["num_requests"] * (output_len if isinstance(output_len, int) else output_len[0])
        for key, run in scenario["runs"].items():
            where = f"{name}/{key}"
            assert run["num_completed"] == run["num_requests"] == workload["num_requests"], (where, run["errors"])
            assert run["num_output_tokens"] == expected_tokens, where
            assert run["output_throughput_tokens_per_s"] > 0, where
            assert 0 < run["ttft_s"]["p50"] <= run["e2e_s"]["p50"], where
            assert len(run["ttft_samples_s"]) == workload["num_requests"], where
        for target in scenario["targets"]:
            assert target["status"] in ("PASS", "FAIL", "SKIP"), target


def test_shared_prefix_reports_prefix_hits(results: tuple[Path, dict]) -> None:
    _, data = results
    scenario = next(s for s in data["scenarios"] if s["name"] == "shared_prefix")
    for run in scenario["runs"].values():
        assert 0 < run["prefix_hit_rate"] <= 1
        assert 0 < run["max_prefix_hit_rate"] < 1
        assert [w["up"] for w in run["workers"]] == [True, True]


def test_the_llama_cpp_scenario_runs_both_precisions_against_the_roofline(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`vs_llama_cpp` in quick mode: our float32 and int8 stacks through HTTP, each W1 run stated
    against the roofline probed at the start; llama-server is skipped with its reason (no GGUF of
    the tiny model)."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", "g", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench.run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["roofline"]["gemm_gflops"]["float32"] > 0 and data["roofline"]["copy_gbps"] > 0
    assert set(data["machine"]["cpu_features"]) >= {"bf16", "vnni", "amx"}
    (scenario,) = data["scenarios"]
    assert scenario["error"] == ""
    for precision in ("fp32", "int8"):
        w1, w2 = scenario["runs"][f"w1 switchyard_{precision}"], scenario["runs"][f"w2 switchyard_{precision}"]
        assert w1["num_completed"] == scenario["config"]["w1"]["num_requests"], w1["errors"]
        assert w2["num_completed"] == scenario["config"]["w2"]["num_requests"], w2["errors"]
        assert 0 < w1["fraction_of_floor"] < 10
    assert set(scenario["skipped"]) == {"llama_q4_1", "llama_bf16"}
    assert "Roofline" in (tmp_path / "latest.md").read_text()


def test_the_batch_wait_scenario_runs_each_wait_on_poisson_arrivals(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`batch_wait` (letter k) in quick mode: one open-loop run per --batch-wait-ms value, each with
    throughput, TTFT percentiles and the workers' step counts."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", "k", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench.run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (scenario,) = json.loads((tmp_path / "latest.json").read_text())["scenarios"]
    assert scenario["name"] == "batch_wait" and scenario["error"] == ""
    workload = scenario["config"]["workload"]
    assert workload["request_rate"] > 0 and workload["concurrency"] is None
    assert set(scenario["runs"]) == {f"wait_{w:g}ms" for w in scenario["config"]["batch_wait_ms"]}
    for key, run in scenario["runs"].items():
        assert run["num_completed"] == run["num_requests"] == workload["num_requests"], (key, run["errors"])
        assert run["output_throughput_tokens_per_s"] > 0, key
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"], key
        assert run["num_steps"] > 0 and run["mean_requests_per_step"] >= 1, key
    assert [t["status"] for t in scenario["targets"]] in (["PASS"], ["FAIL"])


def test_the_host_tier_scenario_runs_without_and_with_the_host_tier(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`host_tier` (letter l) in quick mode: one run without L2 and one with, on a working set 4x the
    device pool; only the run with L2 has host-tier hits and host blocks cached at the end."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", "l", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench.run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (scenario,) = json.loads((tmp_path / "latest.json").read_text())["scenarios"]
    assert scenario["name"] == "host_tier" and scenario["error"] == ""
    config, workload = scenario["config"], scenario["config"]["workload"]
    assert config["working_set_vs_device"] == 4.0
    assert set(scenario["runs"]) == {"without_l2", "with_l2"}
    for key, run in scenario["runs"].items():
        assert run["num_completed"] == run["num_requests"] == workload["num_requests"], (key, run["errors"])
        assert run["num_output_tokens"] == workload["num_requests"] * workload["output_len"], key
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p90"], key
        assert run["prefix_hit_tokens_device"] + run["prefix_hit_tokens_host"] <= config["max_prefix_hit_tokens"], key
    without, with_l2 = scenario["runs"]["without_l2"], scenario["runs"]["with_l2"]
    assert without["prefix_hit_tokens_host"] == 0 and without["host_blocks_cached"] == 0
    assert with_l2["prefix_hit_tokens_host"] > 0 and with_l2["host_blocks_cached"] > 0
    assert {"with_l2/without_l2", "ttft_p50 with_l2/without_l2"} <= set(scenario["ratios"])
    assert all(t["status"] in ("PASS", "FAIL") for t in scenario["targets"]), scenario["targets"]


def test_the_tensor_parallel_scenario_runs_whole_and_split(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`tensor_parallel` (letter m) in quick mode: the same workload on a TP=1 and a TP=2 worker, both
    complete, and the split/whole ratio is recorded."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", "m", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench.run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (scenario,) = json.loads((tmp_path / "latest.json").read_text())["scenarios"]
    assert scenario["name"] == "tensor_parallel" and scenario["error"] == ""
    workload = scenario["config"]["workload"]
    assert set(scenario["runs"]) == {"tp1", "tp2"}
    for key, run in scenario["runs"].items():
        assert run["num_completed"] == run["num_requests"] == workload["num_requests"], (key, run["errors"])
    assert scenario["ratios"]["tp2/tp1"] > 0


def test_the_speculative_scenario_runs_both_workloads_with_and_without(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`speculative` (letter n) in quick mode: the three workloads on a stack without speculation and
    on one with it; every request completes, and only the runs with speculation verify drafts."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", "n", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench.run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (scenario,) = json.loads((tmp_path / "latest.json").read_text())["scenarios"]
    assert scenario["name"] == "speculative" and scenario["error"] == ""
    runs = scenario["runs"]
    assert set(runs) == {f"{w}_{mode}" for w in ("grounded", "random", "rejected") for mode in ("plain", "ngram")}
    for key, run in runs.items():
        assert run["num_completed"] == run["num_requests"] > 0, (key, run["errors"])
    assert runs["grounded_plain"]["num_draft_tokens"] == runs["random_plain"]["num_draft_tokens"] == 0
    assert runs["rejected_plain"]["num_draft_tokens"] == 0
    assert runs["grounded_ngram"]["num_draft_tokens"] > 0
    assert {"grounded ngram/plain", "random ngram/plain", "rejected ngram/plain"} <= set(scenario["ratios"])


def test_the_structured_output_scenario_runs_free_and_constrained(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`structured_output` (letter o) in quick mode: the same prompts free and with a json_schema
    response_format at two concurrencies; every request completes and each ratio is recorded."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", "o", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench.run exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (scenario,) = json.loads((tmp_path / "latest.json").read_text())["scenarios"]
    assert scenario["name"] == "structured_output" and scenario["error"] == ""
    concurrencies = scenario["config"]["concurrencies"]
    assert set(scenario["runs"]) == {f"{mode}_c{c}" for mode in ("free", "constrained") for c in concurrencies}
    for key, run in scenario["runs"].items():
        assert run["num_completed"] == run["num_requests"] == scenario["config"]["num_requests"], (key, run["errors"])
    for c in concurrencies:
        assert scenario["ratios"][f"output throughput constrained/free c{c}"] > 0
        assert scenario["ratios"][f"decode pace constrained/free c{c}"] > 0
    assert [t["name"] for t in scenario["targets"]] == [
        f"decode pace (1/TPOT), constrained/free at concurrency {concurrencies[-1]}"]
