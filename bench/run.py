"""`python -m bench.run [--scenarios a,b,...] [--quick] [--merge] [--out DIR]`: what `make bench` runs.

Runs the chosen scenarios one after another (they share two cores, so never side by side), then
writes `latest.json`, `latest.md` and the plots into DIR (default bench/results). A scenario that
crashes is recorded with its error and the run goes on: an hour of measurements should not be
lost to the last scenario. Exit status: 0 when every scenario ran (targets may still FAIL: they
are findings, not tests), 1 when a scenario crashed, 2 for bad arguments.

Scenarios are named in full or by letter: a small_vs_hf, b tiny_stack_vs_engine, c null_ttft,
d shared_prefix, e concurrency_sweep, f http_api, g vs_llama_cpp, h mixed_goodput, i pipeline_cost,
j tiny_mixed_vs_hf, k batch_wait, l host_tier, m tensor_parallel, n speculative, o structured_output.
Every run starts with the roofline probe (bench/roofline.py): GEMM throughput per precision, copy
bandwidth, CPU features.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.plots import write_plots  # noqa: E402 - after the offline switches above
from bench.report import REPO_ROOT, ScenarioResult, write_results  # noqa: E402
from bench import (batch_wait, host_tier, parallel_workers, pipeline, real_model, roofline, speculative,  # noqa: E402
                   structured_output)
from bench.scenarios import SCENARIOS as STACK_SCENARIOS  # noqa: E402
from bench.scenarios import Options  # noqa: E402

# Letters follow this order; a new scenario goes at the end so existing letters keep their meaning.
SCENARIOS = {**STACK_SCENARIOS, **real_model.SCENARIOS, **pipeline.SCENARIOS, **batch_wait.SCENARIOS,
             **host_tier.SCENARIOS, **parallel_workers.SCENARIOS, **speculative.SCENARIOS,
             **structured_output.SCENARIOS}
LETTERS = dict(zip("abcdefghijklmno", SCENARIOS))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="scenarios: " + ", ".join(f"{k}={v}" for k, v in LETTERS.items()))
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated names or letters (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="few short requests, tiny model everywhere: checks the harness, measures nothing")
    p.add_argument("--merge", action="store_true",
                   help="keep the other scenarios already in DIR/latest.json (each keeps its own date and commit)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="where results go")
    args = p.parse_args(argv)
    names = []
    for item in filter(None, (s.strip() for s in args.scenarios.split(","))):
        name = LETTERS.get(item, item)
        if name not in SCENARIOS:
            p.error(f"--scenarios: unknown scenario {item!r}; known: {', '.join(SCENARIOS)} (or a-{list(LETTERS)[-1]})")
        names.append(name)
    args.names = list(dict.fromkeys(names))
    return args


def run_scenario(name: str, options: Options) -> ScenarioResult:
    run, description = SCENARIOS[name]
    result = ScenarioResult(name, description, {"quick": options.quick})
    print(f"== {name}: {description}", flush=True)
    t0 = time.perf_counter()
    try:
        run(options, result)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - recorded; the remaining scenarios still run
        traceback.print_exc()
        result.error = f"{type(e).__name__}: {e}"
    result.duration_s = time.perf_counter() - t0
    for t in result.targets:
        print(f"  {t.status:<4} {t.name}: {t.measured if t.measured is None else round(t.measured, 3)} "
              f"(wanted {t.op} {t.target:g}{t.unit and ' ' + t.unit})", flush=True)
    for key, why in result.skipped.items():
        print(f"  skipped {key}: {why}", flush=True)
    print(f"== {name} done in {result.duration_s:.0f} s", flush=True)
    return result


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so a SIGTERM also stops the stacks a scenario started


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    print("== roofline probe", flush=True)
    probe = roofline.probe(min_s=0.2 if args.quick else 1.0)
    print(f"  {roofline.describe(probe)}", flush=True)
    options = Options(quick=args.quick, roofline=probe)
    results = [run_scenario(name, options) for name in args.names]
    out = args.out.resolve()
    data = write_results(out, results, quick=args.quick, merge=args.merge, roofline=probe)
    for path in write_plots(data, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
