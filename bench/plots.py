"""Plots drawn from the results JSON alone (`python -m bench.plots [latest.json]` redraws them):

- throughput_vs_concurrency.png: output tokens/s and TTFT against concurrency (concurrency_sweep);
- ttft_cdf.png: TTFT distributions, our stack vs the Hugging Face peers (small_vs_hf) and
  cache-aware vs round-robin routing (shared_prefix).

A panel whose scenario was not run says so instead of vanishing, so the files always exist and a
reader is never left guessing whether a missing line means "not run" or "zero".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a benchmark box
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

_LABELS = {"stack": "Switchyard (full stack)", "hf_static": "HF static batching",
           "hf_continuous": "HF continuous batching", "cache_aware": "cache-aware routing",
           "round_robin": "round robin"}


def _scenario(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((s for s in results["scenarios"] if s["name"] == name), None)


def _plain_log_labels(axis: Axis) -> None:
    """Log-axis labels as 1, 2, 5, 10, 20, ... instead of 2×10^1: milliseconds read at a glance."""
    def label(value: float, _: int) -> str:
        low, high = axis.get_view_interval()
        wanted = "12345" if high / max(low, 1e-9) < 30 else "125" if high / max(low, 1e-9) < 1e3 else "1"
        return f"{value:g}" if f"{value:.0e}"[0] in wanted else ""
    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def _lengths(params: dict[str, Any]) -> str:
    def one(span: list[int] | None) -> str:
        return "?" if not span else str(span[0]) if span[0] == span[1] else f"{span[0]}–{span[1]}"
    return f"{one(params.get('prompt_len'))} in / {one(params.get('output_len'))} out"


def _empty(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _title(fig: Any, text: str, results: dict[str, Any]) -> None:
    m = results["machine"]
    note = " — quick mode, not comparable" if results.get("quick") else ""
    fig.suptitle(f"{text}{note}\n{m['cpu_model']}, {m['num_cores_usable']} cores, commit {m['git_commit'][:8]}",
                 fontsize=10)


def plot_concurrency(results: dict[str, Any], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sweep = _scenario(results, "concurrency_sweep")
    runs = sorted((sweep or {}).get("runs", {}).values(), key=lambda s: s["concurrency"])
    if not runs:
        for ax in (left, right):
            _empty(ax, "concurrency_sweep not run")
    else:
        levels = [s["concurrency"] for s in runs]
        left.plot(levels, [s["output_throughput_tokens_per_s"] for s in runs], "o-", color="C0")
        left.set_ylabel("output tokens/s")
        left.set_title("Throughput")
        left.set_ylim(bottom=0)
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            right.plot(levels, [(s["ttft_s"][q] or 0) * 1000 for s in runs], style, label=f"TTFT {q}")
        right.set_ylabel("time to first token (ms)")
        right.set_yscale("log")
        _plain_log_labels(right.yaxis)
        right.set_title("Time to first token")
        right.legend()
        workload = sweep["config"].get("workload", {})
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel(f"concurrent requests ({_lengths(workload)} tokens)")
            ax.grid(True, which="both", alpha=0.3)
    _title(fig, "Switchyard, 1 worker: throughput and TTFT vs concurrency", results)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cdf(ax: Axes, results: dict[str, Any], name: str, keys: tuple[str, ...], title: str) -> None:
    ax.set_title(f"{name}: {title}")
    runs = (_scenario(results, name) or {}).get("runs", {})
    drawn = False
    for i, key in enumerate(keys):
        run = runs.get(key) or {}
        if run.get("ttft_samples_s"):
            ms = sorted(t * 1000 for t in run["ttft_samples_s"])
            ax.step(ms, [(j + 1) / len(ms) for j in range(len(ms))], where="post", color=f"C{i}",
                    label=f"{_LABELS.get(key, key)} (p50 {run['ttft_s']['p50'] * 1000:.0f} ms)")
            drawn = True
    if not drawn:
        _empty(ax, f"{name} not run")
        return
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def plot_ttft_cdf(results: dict[str, Any], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _cdf(left, results, "small_vs_hf", ("stack", "hf_static", "hf_continuous"), "stack vs Hugging Face peers")
    _cdf(right, results, "shared_prefix", ("cache_aware", "round_robin"), "routing policies (2 workers)")
    _title(fig, "TTFT distribution", results)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_concurrency(results, out_dir / "throughput_vs_concurrency.png"),
            plot_ttft_cdf(results, out_dir / "ttft_cdf.png")]


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
    for written in write_plots(json.loads(source.read_text()), source.parent):
        print(f"wrote {written}")
