"""What a benchmark run leaves behind: `latest.json` (everything, for machines and for plots.py) and
`latest.md` (tables for people), plus the result shape the scenarios fill in.

Numbers without the machine they came from are useless to compare, so both files start with the
machine's facts (cores, CPU model, torch threads, commit). Targets are reported, never enforced:
benchmarks are not tests, and a FAIL here is a finding for whoever runs `make bench`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.records import RequestRecord, summarize
from shared.cpu_features import cpu_features

REPO_ROOT = Path(__file__).resolve().parent.parent
_OPS = {">=": lambda m, t: m >= t, "<=": lambda m, t: m <= t, "<": lambda m, t: m < t, ">": lambda m, t: m > t}


@dataclass
class Target:
    name: str
    measured: float | None  # None: a run it needs was skipped or failed
    op: str  # one of _OPS
    target: float
    unit: str = ""

    @property
    def status(self) -> str:
        if self.measured is None:
            return "SKIP"
        return "PASS" if _OPS[self.op](self.measured, self.target) else "FAIL"


@dataclass
class ScenarioResult:
    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # runner -> summarize() + extras
    skipped: dict[str, str] = field(default_factory=dict)  # runner -> why it did not run
    ratios: dict[str, float | None] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    error: str = ""  # the scenario itself crashed (the rest of the run went on)
    duration_s: float = 0.0

    def add_run(self, key: str, records: list[RequestRecord], duration_s: float, **extra: Any) -> dict[str, Any]:
        summary = summarize(records, duration_s)
        # Raw TTFTs stay in the JSON so plots (CDFs) can be redrawn from the file alone.
        summary["ttft_samples_s"] = sorted(round(r.ttft_s, 6) for r in records if not r.error and r.ttft_s is not None)
        summary["errors"] = sorted({r.error for r in records if r.error})[:5]
        summary.update(extra)
        self.runs[key] = summary
        return summary

    def metric(self, key: str, *path: str) -> float | None:
        value: Any = self.runs.get(key)
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        return value if isinstance(value, (int, float)) else None

    def ratio(self, name: str, num: str, den: str, *path: str) -> float | None:
        """runs[num]/runs[den] of one metric (output throughput unless `path` says otherwise)."""
        path = path or ("output_throughput_tokens_per_s",)
        a, b = self.metric(num, *path), self.metric(den, *path)
        self.ratios[name] = a / b if a is not None and b else None
        return self.ratios[name]

    def target(self, name: str, measured: float | None, op: str, target: float, unit: str = "") -> None:
        self.targets.append(Target(name, measured, op, target, unit))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = [{**asdict(t), "status": t.status} for t in self.targets]
        return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts() -> dict[str, Any]:
    import torch  # noqa: PLC0415 - only for its version and thread count

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_features().model_name,
        "num_cores": os.cpu_count(),
        "num_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "cpu_features": cpu_features().summary(),
    }


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value * scale:.{digits}f}"


def _run_row(key: str, s: dict[str, Any]) -> str:
    cells = [key, f"{s['num_completed']}/{s['num_requests']}", _fmt(s["duration_s"]),
             _fmt(s["request_throughput_per_s"], digits=2), _fmt(s["output_throughput_tokens_per_s"]),
             *(_fmt(s["ttft_s"][q], 1000) for q in ("p50", "p90", "p99")),
             _fmt(s["tpot_s"]["p50"], 1000), _fmt(s["itl_s"]["p50"], 1000), _fmt(s["e2e_s"]["p50"], digits=2)]
    return "| " + " | ".join(cells) + " |"


_RUN_HEADER = ("| runner | done | wall s | req/s | out tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms "
               "| TPOT p50 ms | ITL p50 ms | E2E p50 s |\n|" + " --- |" * 11)


def _targets_table(scenarios: list[dict[str, Any]]) -> list[str]:
    lines = ["| scenario | target | measured | wanted | result |", "| --- | --- | --- | --- | --- |"]
    for sc in scenarios:
        for t in sc["targets"]:
            unit = f" {t['unit']}" if t["unit"] and t["measured"] is not None else ""
            measured = _fmt(t["measured"], digits=3) + unit
            wanted = f"{t['op']} {t['target']:g} {t['unit']}".strip()
            lines.append(f"| {sc['name']} | {t['name']} | {measured} | {wanted} | **{t['status']}** |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    from bench.roofline import describe  # noqa: PLC0415 - torch, only when there is a probe to describe

    m = results["machine"]
    lines = [
        "# Switchyard benchmark results", "",
        f"{m['date_utc']} · commit `{m['git_commit'][:12]}`{' (dirty)' if m['git_dirty'] else ''} · "
        f"{m['cpu_model']} · {m['num_cores_usable']}/{m['num_cores']} cores · torch {m['torch_version']} "
        f"({m['torch_num_threads']} threads) · Python {m['python']}"
        + (" · **quick mode (not comparable)**" if results.get("quick") else ""), "",
        "Throughput counts output tokens over the run's wall time; latencies follow vLLM's definitions "
        "(bench/records.py). Targets are findings, not tests.", "",
        *([f"Roofline (measured at the start of this run): {describe(results['roofline'])}.", ""]
          if results.get("roofline") else []),
        "## Targets", "", *_targets_table(results["scenarios"]), "",
    ]
    for sc in results["scenarios"]:
        when = sc.get("measured")
        lines += [f"## {sc['name']}", "", sc["description"], "",
                  *([f"Measured {when['date_utc']} at commit `{(when['git_commit'] or '')[:12]}`"
                     f"{' (dirty)' if when['git_dirty'] else ''}.", ""] if when else []),
                  "Config: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sc["config"].items()), ""]
        if sc["error"]:
            lines += [f"**Scenario failed:** `{sc['error']}`", ""]
        if sc["runs"]:
            lines += [_RUN_HEADER, *(_run_row(k, s) for k, s in sc["runs"].items()), ""]
        lines += [f"- skipped `{k}`: {why}" for k, why in sc["skipped"].items()]
        lines += [f"- ratio {k}: {_fmt(v, digits=3)}" for k, v in sc["ratios"].items()]
        for key, run in sc["runs"].items():
            for name in ("prefix_hit_rate", "max_prefix_hit_rate", "hit_rate_vs_max", "fraction_of_floor",
                         "slo_attainment", "goodput_tokens_per_s", "num_steps", "mean_requests_per_step",
                         "mean_queue_time_ms", "prefix_hit_tokens_device", "prefix_hit_tokens_host",
                         "hit_tokens_vs_max", "host_blocks_cached", "errors"):
                if run.get(name) not in (None, []):
                    lines.append(f"- {key} {name}: {run[name] if name == 'errors' else _fmt(run[name], digits=3)}")
        lines.append(f"\n_{sc['duration_s']:.0f} s_\n")
    return "\n".join(lines)


def write_results(out_dir: Path, scenarios: list[ScenarioResult], *, quick: bool, merge: bool = False,
                  roofline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes latest.json and latest.md into `out_dir`; returns what went into the JSON.

    Every scenario carries `measured` (its date and commit). With `merge`, the scenarios of the
    existing latest.json that were not run again are kept, in their order, with their own stamps,
    so one scenario can be measured again without throwing away an hour of the others.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_facts()
    stamp = {"date_utc": machine["date_utc"], "git_commit": machine["git_commit"], "git_dirty": machine["git_dirty"]}
    fresh = {s.name: {**s.to_json(), "measured": stamp} for s in scenarios}
    merged: list[dict[str, Any]] = []
    previous = out_dir / "latest.json"
    if merge and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("quick") != quick:
            raise ValueError(f"--merge: {previous} was written {'with' if old.get('quick') else 'without'} --quick")
        old_stamp = {k: old["machine"].get(k) for k in stamp}
        merged = [fresh.pop(sc["name"], None) or {**sc, "measured": sc.get("measured", old_stamp)}
                  for sc in old["scenarios"]]
    results = {"machine": machine, "roofline": roofline, "quick": quick, "scenarios": merged + list(fresh.values())}
    (out_dir / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "latest.md").write_text(render_markdown(results))
    return results
