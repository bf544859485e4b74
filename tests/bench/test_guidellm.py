"""A third-party client, GuideLLM, drives the HTTP API unchanged and measures the throughput we do.

GuideLLM lives in its own virtualenv (`make bench-tools`); without it the end-to-end test is skipped,
naming the command that installs it. The helpers that need no GuideLLM (its command line, reading its
report, finding its virtualenv) are tested either way.

The workload is 32 requests of 32 prompt / 64 output tokens at concurrency 4: about 5 s a run on the
tiny model, long enough that start and tail effects stay small beside 10%. The throughput check is
judged on a steady round (bench.guidellm_check.check): on a 2-core virtual machine shared with other
work, the workers' step time swings by 20% from one run to the next, and no 10% comparison means
anything then; such a run reports the numbers and skips that one assertion, never the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import guidellm_check as gc
from deploy.stack import Stack, start_stack, stop_stack
from tests.deploy.test_stack import make_config

NUM_REQUESTS, CONCURRENCY, PROMPT_TOKENS, OUTPUT_TOKENS = 32, 4, 32, 64

needs_guidellm = pytest.mark.skipif(
    not gc.available(),
    reason=f"GuideLLM is not installed at {gc.guidellm_venv()}: `make bench-tools` installs it "
           "(GUIDELLM_VENV points at another virtualenv)")


def test_available_follows_guidellm_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUIDELLM_VENV", str(tmp_path / "venv"))
    assert not gc.available()
    exe = tmp_path / "venv" / "bin" / "guidellm"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert gc.available() and gc.guidellm_bin() == exe


def test_command_is_local_synthetic_and_closed_loop(tmp_path: Path) -> None:
    cmd = gc.guidellm_command("http://127.0.0.1:8000/", "models/tiny-llama", model_name="tiny-llama",
                              num_requests=16, concurrency=4, prompt_tokens=32, output_tokens=24,
                              report_path=tmp_path / "r.json", seed=3)
    args = dict(zip(cmd[2::2], cmd[3::2]))
    assert cmd[1] == "run"
    assert args["--backend"] == ("kind=openai_http,target=http://127.0.0.1:8000,model=tiny-llama,"
                                 "request_format=/v1/completions,extras.body.temperature=0")
    assert args["--profile"] == "kind=concurrent,streams=4"
    assert args["--constraint"] == "kind=max_requests,count=16"
    # The tokenizer is the local directory (never a hub id) and the data is made up, not downloaded.
    assert args["--tokenizer"] == f"kind=huggingface_auto,model={Path('models/tiny-llama').absolute()}"
    assert args["--data"] == "kind=synthetic_text,prompt_tokens=32,output_tokens=24"
    assert args["--output"] == f"kind=json,path={tmp_path / 'r.json'}"
    env = gc._guidellm_env()
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1" and "PYTHONPATH" not in env


def _stats(mean: float = 0.0, total: float = 0.0, p50: float = 0.0, count: int = 1) -> dict:
    return {"successful": {"mean": mean, "total_sum": total, "count": count, "percentiles": {"p50": p50}}}


def test_parse_report_reads_throughput_and_spots_a_lost_update(tmp_path: Path) -> None:
    def request(start: float, end: float) -> dict:
        return {"info": {"timings": {"request_start": start, "request_end": end}},
                "input_metrics": {"cached_tokens": 0}}

    bench = {
        "duration": 2.0, "warmup_duration": 0.0, "cooldown_duration": 0.0,
        "scheduler_state": {"created_requests": 4, "processing_requests": 1, "end_processing_time": None},
        "requests": {"successful": [request(10.0, 11.0), request(10.5, 12.0), request(11.0, 12.0)]},
        "metrics": {
            "request_totals": {"successful": 3, "errored": 0, "incomplete": 0, "total": 3},
            "output_tokens_per_second": _stats(mean=48.0), "requests_per_second": _stats(mean=1.5),
            "time_to_first_token_ms": _stats(p50=25.0), "output_token_count": _stats(total=96),
            "prompt_token_count": _stats(total=96), "request_concurrency": _stats(mean=1.75),
        },
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"metadata": {"guidellm_version": "0.8.1"}, "benchmarks": [bench]}))
    out = gc.parse_report(path)
    assert out["output_tokens_per_s"] == 48.0 and out["requests_per_s"] == 1.5
    assert out["ttft_p50_s"] == pytest.approx(0.025)
    assert out["num_completed"] == 3 and out["num_output_tokens"] == 96
    assert out["request_window_output_tokens_per_s"] == pytest.approx(96 / 2.0)
    assert out["num_lost"] == 1  # processing when GuideLLM stopped, never reported: its shutdown race


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # One worker: two single-threaded workers, the scheduler, the front door and the client would
    # oversubscribe a 2-core machine, and consecutive runs of our own client alone would swing by 30%.
    config = make_config(tmp_path_factory.mktemp("run"), tiny_model_dir,
                         services=("worker", "scheduler", "tokenizer"), num_workers=1)
    running = start_stack(config)
    yield running
    stop_stack(config.run_dir, grace_s=5.0, quiet=True)


@pytest.mark.e2e
@needs_guidellm
@pytest.mark.timeout(900)
def test_guidellm_throughput_agrees_with_ours(stack: Stack, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert stack.http_url
    result = gc.check(stack.http_url, tiny_model_dir, num_requests=NUM_REQUESTS, concurrency=CONCURRENCY,
                      prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS, out_dir=tmp_path,
                      worker_metrics_urls=gc.worker_metrics_urls(stack), max_rounds=4)
    report = "\n".join(gc.report_lines(result))
    theirs, ours = result["guidellm"], result["ours"]
    # GuideLLM ran every request to its full length against the unchanged API (ignore_eos reached us).
    assert (theirs["num_completed"], theirs["num_errored"], theirs["num_incomplete"]) == (NUM_REQUESTS, 0, 0), report
    assert theirs["num_output_tokens"] == NUM_REQUESTS * OUTPUT_TOKENS, report
    assert theirs["num_prompt_tokens"] == NUM_REQUESTS * PROMPT_TOKENS, report
    for run in (ours["before"], ours["after"]):
        assert run["num_completed"] == NUM_REQUESTS and run["num_output_tokens"] == NUM_REQUESTS * OUTPUT_TOKENS
    assert Path(theirs["raw_path"]).is_file() and "guidellm" in theirs["command"]
    if not result["steady"]:  # judged only on a round the machine let us measure (see gc.check)
        pytest.skip("throughput not compared: no steady round (other work on the machine, or the server's speed "
                    "changed between the runs: see the workers' step times): "
                    f"{result['rounds']}\n{report}")
    assert result["within_tolerance"], report
