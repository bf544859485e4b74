"""bench.report: results files, and --merge keeping the scenarios that were not run again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.records import RequestRecord
from bench.report import ScenarioResult, write_results


def _scenario(name: str, tok_per_s: float) -> ScenarioResult:
    r = ScenarioResult(name, f"{name} description", {"quick": False})
    # One request, 10 tokens a tenth of a second apart: throughput is what the duration says.
    record = RequestRecord("r", 4, start_s=0.0, token_times_s=[0.1 * (i + 1) for i in range(10)], end_s=1.0,
                           output_token_ids=list(range(10)))
    r.add_run("stack", [record], 10 / tok_per_s)
    r.target("throughput", r.metric("stack", "output_throughput_tokens_per_s"), ">=", 5.0, "tok/s")
    return r


def test_merge_replaces_only_the_scenarios_run_again(tmp_path: Path) -> None:
    write_results(tmp_path, [_scenario("a", 10.0), _scenario("b", 2.0)], quick=False)
    first = json.loads((tmp_path / "latest.json").read_text())
    b_stamp = first["scenarios"][1]["measured"]

    write_results(tmp_path, [_scenario("a", 20.0)], quick=False, merge=True)
    merged = json.loads((tmp_path / "latest.json").read_text())
    assert [s["name"] for s in merged["scenarios"]] == ["a", "b"]  # order kept
    a, b = merged["scenarios"]
    assert a["runs"]["stack"]["output_throughput_tokens_per_s"] == pytest.approx(20.0)
    assert b["runs"]["stack"]["output_throughput_tokens_per_s"] == pytest.approx(2.0)
    assert b["measured"] == b_stamp  # the kept scenario still says when it was measured
    assert b["targets"][0]["status"] == "FAIL" and a["targets"][0]["status"] == "PASS"
    text = (tmp_path / "latest.md").read_text()
    assert text.count("Measured ") == 2 and "| b | throughput |" in text

    write_results(tmp_path, [_scenario("c", 1.0)], quick=False)  # no merge: only what ran
    assert [s["name"] for s in json.loads((tmp_path / "latest.json").read_text())["scenarios"]] == ["c"]


def test_merge_refuses_to_mix_quick_and_full_results(tmp_path: Path) -> None:
    write_results(tmp_path, [_scenario("a", 10.0)], quick=True)
    with pytest.raises(ValueError, match="--quick"):
        write_results(tmp_path, [_scenario("a", 10.0)], quick=False, merge=True)
