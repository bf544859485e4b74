"""A third-party benchmark client, GuideLLM, drives the OpenAI-compatible HTTP API unchanged; its
throughput must agree with our own measurement of the same workload within 10%.

GuideLLM lives in its own virtualenv (`make bench-tools` makes `bench/.venv-guidellm`; the variable
GUIDELLM_VENV points elsewhere) so its dependencies never disturb the project's pins. It is run as a
command, never imported, and it never reaches a model hub: the tokenizer is the local model
directory, HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set, and the data is synthetic
(`kind=synthetic_text` with fixed prompt and output token counts).

Both sides use the same definitions, so the numbers compare like with like:

- workload: `num_requests` independent prompts of exactly `prompt_tokens` tokens, each generating
  exactly `output_tokens` tokens. GuideLLM's synthetic data sets `max_tokens` and `ignore_eos: true`
  on every request by itself (see its TextCompletionsRequestHandler.format), with text prompts its
  tokenizer sized; ours (`bench.clients.run_http` on a `random_workload`) sends token ids, greedy.
- load: closed loop, `concurrency` streams, each sending its next request as soon as the last one
  ends (GuideLLM's `concurrent` profile), no warmup or cooldown excluded (GuideLLM's defaults).
- output tokens: the server's own count (`usage.completion_tokens` of the last streamed chunk);
  GuideLLM prefers it too over counting with its tokenizer.
- throughput: output tokens of completed requests / wall time from the first request sent to the
  last one finished. GuideLLM's `output_tokens_per_second.successful.mean` is exactly that (its
  rate distribution is time-weighted over the benchmark's duration).

Beyond the definitions, three differences in what the server was asked to do, or had left to do it
with, were found and removed:

- Sampling: ours is greedy (temperature 0); GuideLLM sends no temperature, so the server sampled at
  its default of 1, which costs the worker more per step than argmax. `extras.body.temperature=0` in
  its backend options adds the field to every request body.
- Prompts: every run (ours or GuideLLM's) gets its own seed, or a run would find the previous run's
  prompt prefixes in the server's prefix cache, skip that prefill and be routed differently.
- Client load: by default GuideLLM's data-loader process keeps generating thousands of prompts
  during the benchmark, CPU taken from the server on a 2-core box; `--data-loader
  kind=pytorch,samples=N` makes the N prompts before the clock starts, as ours does.

The stack it starts has one worker: two single-threaded workers, the scheduler, the front door and
a client oversubscribe 2 cores, and then consecutive runs of our own client alone differ by 30%.
What is left is the machine: on a shared 2-core virtual machine the workers' step time swings by
10-20% between runs whoever the client is, so `check` judges only steady rounds (see there).

`python -m bench.guidellm_check` starts a stack on free ports, warms it up, runs both and prints the
two numbers and their ratio (`--base-url` measures a running server instead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.records import summarize
from bench.workload import Workload, random_workload

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / "bench" / ".venv-guidellm"
DEFAULT_MODEL = REPO_ROOT / "models" / "tiny-llama"
RESULTS_DIR = REPO_ROOT / "bench" / "results" / "tmp"  # gitignored
TOLERANCE = 0.10  # GuideLLM's output throughput within 10% of ours
BUSY_LIMIT_CORES = 0.3  # other work's load above which a round cannot tell 10% (the stack idles at ~0.05)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class GuideLLMError(RuntimeError):
    """GuideLLM failed or wrote no usable report; the message names its log."""


def guidellm_venv() -> Path:
    return Path(os.environ.get("GUIDELLM_VENV") or DEFAULT_VENV)


def guidellm_bin() -> Path:
    return guidellm_venv() / "bin" / "guidellm"


def available() -> bool:
    """Whether the GuideLLM virtualenv exists (`make bench-tools`)."""
    exe = guidellm_bin()
    return exe.is_file() and os.access(exe, os.X_OK)


def guidellm_command(base_url: str, model_dir: str | Path, *, model_name: str, num_requests: int,
                     concurrency: int, prompt_tokens: int, output_tokens: int, report_path: Path,
                     seed: int = 0) -> list[str]:
    """The `guidellm run` command line for one closed-loop benchmark of the HTTP API at `base_url`."""
    return [
        str(guidellm_bin()), "run",
        # extras.body: fields added to every request body. temperature 0 makes it greedy like ours
        # (bench.clients.run_http); GuideLLM sends none, and the server's default of 1 samples, which
        # costs the worker more per step than argmax. max_tokens and ignore_eos it sets by itself.
        "--backend", f"kind=openai_http,target={base_url.rstrip('/')},model={model_name},"
                     "request_format=/v1/completions,extras.body.temperature=0",
        "--profile", f"kind=concurrent,streams={concurrency}",
        "--constraint", f"kind=max_requests,count={num_requests}",
        "--tokenizer", f"kind=huggingface_auto,model={Path(model_dir).absolute()}",
        "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
        # Make all the prompts before the clock starts, as our client does: by default GuideLLM's
        # data-loader process keeps generating thousands of prompts ahead while the benchmark runs,
        # taking CPU from the server on a small machine.
        "--data-loader", f"kind=pytorch,samples={num_requests}",
        "--seed", f"kind=static,value={seed}",
        "--output", f"kind=json,path={report_path}",
        "--disable-console-interactive",
    ]


def _guidellm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **OFFLINE_ENV}


def parse_report(report_path: Path) -> dict[str, Any]:
    """The numbers of the (single) benchmark in a GuideLLM JSON report."""
    report = json.loads(Path(report_path).read_text())
    benchmarks = report.get("benchmarks") or []
    if len(benchmarks) != 1:
        raise GuideLLMError(f"{report_path}: expected one benchmark, found {len(benchmarks)}")
    bench = benchmarks[0]
    metrics = bench["metrics"]
    state = bench.get("scheduler_state") or {}
    totals = metrics["request_totals"]
    ttft_ms = metrics["time_to_first_token_ms"]["successful"]
    done = bench["requests"]["successful"]
    starts = [r["info"]["timings"]["request_start"] for r in done if r["info"]["timings"]["request_start"]]
    ends = [r["info"]["timings"]["request_end"] for r in done if r["info"]["timings"]["request_end"]]
    window_s = max(ends) - min(starts) if starts and ends else None
    num_output = metrics["output_token_count"]["successful"]["total_sum"]
    return {
        "output_tokens_per_s": metrics["output_tokens_per_second"]["successful"]["mean"],
        "requests_per_s": metrics["requests_per_second"]["successful"]["mean"],
        "ttft_p50_s": ttft_ms["percentiles"]["p50"] / 1000 if ttft_ms.get("count") else None,
        "num_completed": totals["successful"],
        "num_errored": totals["errored"],
        "num_incomplete": totals["incomplete"],
        "num_output_tokens": num_output,
        "num_prompt_tokens": metrics["prompt_token_count"]["successful"]["total_sum"],
        "duration_s": bench["duration"],
        "warmup_s": bench.get("warmup_duration"),
        "cooldown_s": bench.get("cooldown_duration"),
        # The same tokens over our window, first request sent -> last one ended, from GuideLLM's own
        # per-request timings: equal to its headline number when its duration means what ours does.
        "request_window_output_tokens_per_s": num_output / window_s if window_s else None,
        "mean_concurrency": metrics["request_concurrency"]["successful"]["mean"],
        "num_cached_tokens": sum(r["input_metrics"].get("cached_tokens") or 0 for r in done),
        "num_created": state.get("created_requests"),
        # Requests GuideLLM saw start but whose completion never reached its report (see run_guidellm).
        "num_lost": state.get("processing_requests", 0) if state.get("end_processing_time") is None else 0,
        "guidellm_version": report.get("metadata", {}).get("guidellm_version"),
    }


def run_guidellm(base_url: str, model_dir: str, *, model_name: str, num_requests: int, concurrency: int,
                 prompt_tokens: int, output_tokens: int, out_dir: Path, timeout_s: float = 600.0,
                 seed: int = 0, max_runs: int = 3) -> dict:
    """Runs `guidellm run` (concurrent profile, a max-requests constraint) against `base_url` and
    returns its throughput: output_tokens_per_s, requests_per_s, ttft_p50_s, raw_path, command, ...

    The report is `out_dir/guidellm.json`, GuideLLM's console output `out_dir/guidellm.log`.

    GuideLLM 0.8.1 has a shutdown race: its receiver thread sets the shutdown event in the callback
    for the last completion *before* queueing that update, and a consumer whose poll times out in
    between sees the event and stops, so the report lacks the last request although the server
    answered it (`scheduler_state`: end_processing_time null, processing_requests 1, no errors). A
    run that lost an update that way is run again, up to `max_runs` runs in all; `runs` says how
    many it took and `lost_updates` how many requests the discarded runs lost."""
    if not available():
        raise GuideLLMError(f"GuideLLM is not installed at {guidellm_venv()}; `make bench-tools` installs it")
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "guidellm.json"
    log_path = out_dir / "guidellm.log"
    lost = 0
    for run in range(1, max_runs + 1):
        # A new seed for a rerun: the same prompts again would find their prefixes in the server's cache.
        command = guidellm_command(base_url, model_dir, model_name=model_name, num_requests=num_requests,
                                   concurrency=concurrency, prompt_tokens=prompt_tokens,
                                   output_tokens=output_tokens, report_path=report_path, seed=seed + run - 1)
        report_path.unlink(missing_ok=True)
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.run(command, cwd=out_dir, env=_guidellm_env(), stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise GuideLLMError(f"guidellm ran past {timeout_s:.0f} s; see {log_path}") from None
        if proc.returncode != 0 or not report_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise GuideLLMError(f"guidellm exited {proc.returncode} (report written: {report_path.exists()}); "
                                f"last lines of {log_path}:\n{tail}")
        result = parse_report(report_path)
        if not result["num_lost"] or run == max_runs:
            break
        lost += result["num_lost"]
        report_path.replace(out_dir / f"guidellm-lost-update-{run}.json")  # kept for a look
    return {**result, "runs": run, "lost_updates": lost, "raw_path": str(report_path),
            "log_path": str(log_path), "command": shlex.join(command)}


# ---- our measurement: bench.clients.run_http, the project's own closed-loop HTTP client ----------

def reference_workload(*, num_requests: int, concurrency: int, prompt_tokens: int, output_tokens: int,
                       vocab_size: int, seed: int = 0) -> Workload:
    return random_workload("guidellm-check", num_requests=num_requests, prompt_len=(prompt_tokens, prompt_tokens),
                           output_len=(output_tokens, output_tokens), vocab_size=vocab_size,
                           concurrency=concurrency, seed=seed)


def run_reference(base_url: str, model_dir: str | Path, *, model_name: str, num_requests: int, concurrency: int,
                  prompt_tokens: int, output_tokens: int, seed: int = 0) -> dict:
    """Our measurement of the same workload with `bench.clients.run_http`: `concurrency` closed-loop
    streams over `num_requests` random token-id prompts, ignore_eos, SSE streaming of `/v1/completions`;
    output tokens/s = completion tokens (the server's usage count) / wall time."""
    from bench.clients import run_http  # noqa: PLC0415 (pulls in grpc and the generated stubs)

    vocab_size = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    workload = reference_workload(num_requests=num_requests, concurrency=concurrency, prompt_tokens=prompt_tokens,
                                  output_tokens=output_tokens, vocab_size=vocab_size, seed=seed)
    records, duration_s = asyncio.run(run_http(base_url.rstrip("/"), workload, label="ours", model=model_name))
    summary = summarize(records, duration_s)
    busy_s = sum(r.end_s - r.start_s for r in records if not r.error)
    return {**summary, "output_tokens_per_s": summary["output_throughput_tokens_per_s"],
            "requests_per_s": summary["request_throughput_per_s"], "ttft_p50_s": summary["ttft_s"]["p50"],
            "mean_concurrency": busy_s / duration_s if duration_s > 0 else None}


def compare(ours: dict, theirs: dict, tolerance: float = TOLERANCE) -> dict:
    ratio = theirs["output_tokens_per_s"] / ours["output_tokens_per_s"]
    return {"ratio": ratio, "tolerance": tolerance, "within_tolerance": abs(ratio - 1) <= tolerance}


# ---- a stack of our own on free ports ---------------------------------------------------------------

def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free loopback ports, below the ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def stack_config(run_dir: Path, model_dir: Path, *, num_workers: int = 2,
                 worker_args: tuple[str, ...] = ("--num-threads", "1")):
    """A StackConfig for every service on free ports (metrics included), logs under `run_dir`."""
    from deploy.stack import StackConfig  # noqa: PLC0415 (grpc and friends only when a stack is wanted)

    base = free_port_block(2 * num_workers + 6)
    n = num_workers
    return StackConfig(run_dir=Path(run_dir), model_dir=Path(model_dir), num_workers=n, worker_args=worker_args,
                       worker_base_port=base, worker_base_metrics_port=base + n, scheduler_port=base + 2 * n,
                       scheduler_metrics_port=base + 2 * n + 1, tokenizer_port=base + 2 * n + 2,
                       http_port=base + 2 * n + 3, tokenizer_metrics_port=base + 2 * n + 4,
                       grace_s=2.0, stop_grace_s=10.0)


def worker_metrics_urls(stack: Any) -> list[str]:
    """The /metrics URLs of a `deploy.stack.Stack`'s workers."""
    return [url for name, url in stack.metrics_urls.items() if name.startswith("worker")]


def served_model_name(base_url: str) -> str:
    models = httpx.get(f"{base_url.rstrip('/')}/v1/models", timeout=10).json()["data"]
    return models[0]["id"]


def _bracket(before: dict, after: dict) -> dict:
    """Our two runs around GuideLLM's as one measurement: their mean, and how far apart they were."""
    def mean(key: str) -> float | None:
        values = [run[key] for run in (before, after) if run[key] is not None]
        return sum(values) / len(values) if values else None

    tok_s = mean("output_tokens_per_s")
    return {"output_tokens_per_s": tok_s, "requests_per_s": mean("requests_per_s"), "ttft_p50_s": mean("ttft_p50_s"),
            "num_requests": before["num_requests"],
            "num_completed": min(before["num_completed"], after["num_completed"]),
            "spread": abs(before["output_tokens_per_s"] - after["output_tokens_per_s"]) / tok_s,
            "before": before, "after": after}


def _cpu_times() -> list[int] | None:
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def machine_busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores the whole machine kept busy over `seconds` (Linux /proc/stat, steal included);
    None where that cannot be read. Taken while our stack idles, it is other work's load."""
    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if not a or not b:
        return None
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8])  # user nice system idle iowait irq softirq steal
    return (total - d[3] - d[4]) / total * (os.cpu_count() or 1) if total > 0 else None


def worker_step_totals(metrics_urls: list[str]) -> tuple[float, float] | None:
    """(steps, seconds spent in them) summed over the workers' `switchyard_step_duration_seconds`;
    None without metrics URLs or when a scrape fails."""
    if not metrics_urls:
        return None
    count = total = 0.0
    try:
        for url in metrics_urls:
            for line in httpx.get(url, timeout=10).text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name == "switchyard_step_duration_seconds_count":
                    count += float(line.rsplit(" ", 1)[1])
                elif name == "switchyard_step_duration_seconds_sum":
                    total += float(line.rsplit(" ", 1)[1])
    except (httpx.HTTPError, ValueError):
        return None
    return count, total


def _step_ms(a: tuple[float, float] | None, b: tuple[float, float] | None) -> float | None:
    """Mean worker step time between two `worker_step_totals` readings, in milliseconds."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return 1000 * (b[1] - a[1]) / (b[0] - a[0])


def check(base_url: str, model_dir: Path, *, num_requests: int, concurrency: int, prompt_tokens: int,
          output_tokens: int, out_dir: Path, model_name: str | None = None, warmup_requests: int | None = None,
          seed: int = 0, tolerance: float = TOLERANCE, max_rounds: int = 3,
          worker_metrics_urls: list[str] | None = None) -> dict:
    """Warms the server up, then measures the workload in rounds of ours, GuideLLM's, ours again.

    GuideLLM is compared with the mean of our two runs around it, which cancels a steady drift of
    the machine's speed. A round is steady when nothing but the clients can account for a 10%
    difference: the machine was quiet (other work under BUSY_LIMIT_CORES) just before and just
    after the round while our stack idled, and the server ran at the same speed for both clients.
    Given the workers' metrics URLs, that is the workers' mean step time (model forward and
    sampling): within half the tolerance between GuideLLM's run and ours, with our two runs within
    the tolerance of each other. Both clients make the same steps (same batches, greedy), so a
    slower step is a slower CPU, not a different client; on a shared 2-core virtual machine it swings
    by 10-20% from one run to the next, and throughput with it. Without metrics, our two runs must
    be within half the tolerance. An unsteady round is followed by another, up to `max_rounds`; the
    result is the first steady round, or else the round with the median ratio with `steady` false;
    `rounds` lists them all."""
    model_name = model_name or served_model_name(base_url)
    metrics = list(worker_metrics_urls or ())
    workload = dict(num_requests=num_requests, concurrency=concurrency, prompt_tokens=prompt_tokens,
                    output_tokens=output_tokens)
    warmup = warmup_requests if warmup_requests is not None else 2 * concurrency
    if warmup:
        run_reference(base_url, model_dir, model_name=model_name, **{**workload, "num_requests": warmup},
                      seed=seed + 9999)
    rounds: list[dict] = []
    for index in range(max_rounds):
        # Every run its own seed, so no run finds its prompts' prefixes cached by an earlier one: cache
        # hits save prefill and steer the cache-aware router, which would favour whichever ran second.
        base_seed = seed + 10 * index
        busy_before = machine_busy_cores()
        steps = [worker_step_totals(metrics)]
        before = run_reference(base_url, model_dir, model_name=model_name, **workload, seed=base_seed + 1)
        steps.append(worker_step_totals(metrics))
        theirs = run_guidellm(base_url, str(model_dir), model_name=model_name, **workload,
                              out_dir=Path(out_dir) / f"round-{index + 1}", seed=base_seed + 5)
        steps.append(worker_step_totals(metrics))
        after = run_reference(base_url, model_dir, model_name=model_name, **workload, seed=base_seed + 2)
        steps.append(worker_step_totals(metrics))
        busy_after = machine_busy_cores()
        ours = _bracket(before, after)
        other_load = max((x for x in (busy_before, busy_after) if x is not None), default=0.0)
        step_ms = {"ours_before": _step_ms(steps[0], steps[1]), "guidellm": _step_ms(steps[1], steps[2]),
                   "ours_after": _step_ms(steps[2], steps[3])}
        ours_step = [x for x in (step_ms["ours_before"], step_ms["ours_after"]) if x is not None]
        step_drift = (abs(step_ms["guidellm"] / (sum(ours_step) / len(ours_step)) - 1)
                      if step_ms["guidellm"] is not None and ours_step else None)
        steady = other_load <= BUSY_LIMIT_CORES and (
            ours["spread"] <= tolerance / 2 if step_drift is None
            else ours["spread"] <= tolerance and step_drift <= tolerance / 2)
        compared = compare(ours, theirs, tolerance)
        # For a reader, not for the verdict: the ratio had the server run as fast for GuideLLM as for
        # us (throughput scales with 1 / step time at the same batches).
        adjusted = (compared["ratio"] * step_ms["guidellm"] / (sum(ours_step) / len(ours_step))
                    if step_drift is not None else None)
        rounds.append({"round": index + 1, "ours": ours, "guidellm": theirs, "other_load_cores": other_load,
                       "step_ms": step_ms, "step_drift": step_drift, "speed_adjusted_ratio": adjusted,
                       "steady": steady, **compared})
        if steady:
            break
    final = rounds[-1] if rounds[-1]["steady"] else sorted(rounds, key=lambda r: r["ratio"])[(len(rounds) - 1) // 2]
    result = {"workload": workload, "base_url": base_url, "model": model_name, **final,
              "rounds": [{k: r[k] for k in ("round", "ratio", "within_tolerance", "steady", "other_load_cores",
                                            "step_ms", "step_drift", "speed_adjusted_ratio")} |
                         {"ours_tok_s": r["ours"]["output_tokens_per_s"],
                          "ours_before_tok_s": r["ours"]["before"]["output_tokens_per_s"],
                          "ours_after_tok_s": r["ours"]["after"]["output_tokens_per_s"],
                          "guidellm_tok_s": r["guidellm"]["output_tokens_per_s"], "spread": r["ours"]["spread"]}
                         for r in rounds]}
    (Path(out_dir) / "comparison.json").write_text(json.dumps(result, indent=1))
    return result


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def report_lines(result: dict) -> list[str]:
    ours, theirs = result["ours"], result["guidellm"]
    w = result["workload"]

    def row(name: str, run: dict) -> str:
        ttft = run["ttft_p50_s"] and run["ttft_p50_s"] * 1000
        return (f"{name:16} {_fmt(run['output_tokens_per_s']):>13} {_fmt(run['requests_per_s']):>11} "
                f"{_fmt(ttft, ' ms'):>10} {run['num_completed']:>6}/{w['num_requests']}")

    return [
        f"workload: {w['num_requests']} requests, concurrency {w['concurrency']}, "
        f"{w['prompt_tokens']} prompt / {w['output_tokens']} output tokens, model {result['model']} "
        f"at {result['base_url']}",
        f"guidellm command: {theirs['command']}",
        f"{'':16} {'output tok/s':>13} {'requests/s':>11} {'TTFT p50':>10} {'completed':>10}",
        row("ours (before)", ours["before"]),
        row("guidellm", theirs),
        row("ours (after)", ours["after"]),
        f"ours = mean of before/after: {_fmt(ours['output_tokens_per_s'])} output tok/s "
        f"(they differ by {ours['spread']:.1%}, other work {result['other_load_cores']:.2f} cores: "
        f"round {result['round']} of {len(result['rounds'])}, "
        f"{'steady' if result['steady'] else 'none steady: the median ratio'})",
        "worker step time (ms): " + ", ".join(f"{k} {_fmt(v)}" for k, v in result["step_ms"].items())
        + f"; ratio at equal server speed {_fmt(result['speed_adjusted_ratio'])}",
        f"ratio guidellm/ours (output tokens/s): {result['ratio']:.3f} "
        f"({'within' if result['within_tolerance'] else 'OUTSIDE'} ±{result['tolerance']:.0%})",
        f"guidellm report: {theirs['raw_path']} (duration {theirs['duration_s']:.2f} s)",
    ] + ([] if result["steady"] else [
        "NOT CONCLUSIVE: no round was steady (other work on the machine, or the server's speed changed "
        "between the runs: see step times); rerun on a quiet machine"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.guidellm_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model directory (tokenizer, config)")
    parser.add_argument("--base-url", help="measure this running server instead of starting a stack")
    parser.add_argument("--model-name", help="served model name (default: the first of /v1/models)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of the stack it starts (one: two single-threaded workers plus the "
                             "scheduler, the front door and a client oversubscribe 2 cores, and runs swing)")
    parser.add_argument("--worker-args", default="--num-threads 1", help="extra worker flags of that stack")
    parser.add_argument("--out-dir", type=Path, help=f"where reports go (default: under {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if not available():
        print(f"GuideLLM is not installed at {guidellm_venv()}: run `make bench-tools` "
              "(or point GUIDELLM_VENV at a virtualenv with guidellm 0.8.1)", file=sys.stderr)
        return 2
    out_dir = args.out_dir or RESULTS_DIR / time.strftime("guidellm-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = dict(num_requests=args.num_requests, concurrency=args.concurrency,
                    prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)
    if args.base_url:
        result = check(args.base_url, args.model, **workload, out_dir=out_dir, model_name=args.model_name)
    else:
        from deploy.stack import start_stack, stop_stack  # noqa: PLC0415

        run_dir = Path(tempfile.mkdtemp(prefix="guidellm-stack-", dir=out_dir))
        config = stack_config(run_dir, args.model, num_workers=args.workers,
                              worker_args=tuple(shlex.split(args.worker_args)))
        stack = start_stack(config)
        try:
            result = check(stack.http_url, args.model, **workload, out_dir=out_dir, model_name=args.model_name,
                           worker_metrics_urls=worker_metrics_urls(stack))
        finally:
            stop_stack(run_dir, grace_s=5.0, quiet=True)
    print("\n".join(report_lines(result)))
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
