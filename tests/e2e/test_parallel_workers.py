"""End to end: tensor- and pipeline-parallel workers (`--tensor-parallel-size`,
`--pipeline-parallel-size`, gloo on the CPU) through the whole stack give the greedy tokens of the
unsplit model (float32 TP=1 is token-identical to Hugging Face
`generate`, tests/e2e/test_real_model.py; here each stack is compared with HF up to its first
near-tie), with prefix-cache hits and chunked prefill; a model that cannot be split is refused at
start with the numbers; and a follower rank killed with -9 takes its worker down."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from switchyard.api.v1 import generation_pb2 as pb

from deploy.stack import REPO_ROOT, Stack, start_stack, stop_stack
from tests.chaos.conftest import stubs
from tests.deploy.test_stack import make_config
from tests.reference import assert_greedy_matches, hf_greedy

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16


def running(model_dir: Path, run_dir: Path, tp: int, pp: int = 1) -> Stack:
    config = make_config(run_dir, model_dir, services=("worker", "scheduler", "tokenizer"), num_workers=1,
                         timeout_s=180.0,
                         worker_args=("--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
                                      "--num-threads", "1", "--dtype", "float32"),
                         scheduler_args=("--max-num-batched-tokens", "64"))  # long prompts come in chunks
    return start_stack(config)


def prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(3, vocab_size) for _ in range(40)]  # a prefix-cache hit for the later ones
    return [shared + [rng.randrange(3, vocab_size) for _ in range(n)] for n in (5, 30, 90)] + [[7, 8, 9]]


async def generate_all(stack: Stack, token_prompts: list[list[int]]) -> list[list[int]]:
    async with stubs(stack) as (api, _):
        async def one(ids: list[int]) -> list[int]:
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
            return [t async for r in api.Generate(req, timeout=180) for t in r.token_ids]
        return list(await asyncio.gather(*(one(p) for p in token_prompts)))


@pytest.mark.parametrize("model, tp, pp", [("tiny", 2, 1), ("smollm2", 3, 1), ("tiny", 1, 2), ("tiny", 2, 2)],
                         ids=["tiny-tp2", "smollm2-tp3", "tiny-pp2", "tiny-tp2-pp2"])
async def test_split_model_gives_the_unsplit_greedy_tokens(model, tp, pp, tiny_model_dir, smollm2_model_dir,
                                                           tmp_path) -> None:
    model_dir = tiny_model_dir if model == "tiny" else smollm2_model_dir
    vocab_size = 4096 if model == "tiny" else 49152
    token_prompts = prompts(vocab_size)
    stack = running(model_dir, tmp_path, tp, pp)
    try:
        outputs = await generate_all(stack, token_prompts)
    finally:
        stop_stack(tmp_path, grace_s=5.0, quiet=True)
    compared = 0
    for i, (ids, out) in enumerate(zip(token_prompts, outputs)):
        assert len(out) == MAX_TOKENS
        compared += assert_greedy_matches(hf_greedy(model_dir, ids, MAX_TOKENS), out, f"prompt {i}, TP={tp} PP={pp}")
    assert compared >= 2 * MAX_TOKENS


@pytest.mark.parametrize("flag, message", [
    ("--tensor-parallel-size", "tensor_parallel_size: 8 attention heads are not divisible by 3"),
    ("--pipeline-parallel-size", "pipeline_parallel_size: 4 layers are not divisible by 3"),
])
def test_a_model_that_cannot_be_split_is_refused_with_the_numbers(flag, message, tiny_model_dir) -> None:
    # The tiny model has 8 heads, 4 KV heads and 4 layers: 3 ranks or 3 stages cannot share them.
    result = subprocess.run(
        [sys.executable, "-m", "services.worker", "--model", str(tiny_model_dir), flag, "3",
         "--port", "0", "--metrics-port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def follower_pids(worker_pid: int) -> list[int]:
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_killed_follower_takes_its_worker_down(tiny_model_dir, tmp_path) -> None:
    stack = running(tiny_model_dir, tmp_path, 2)
    try:
        worker = next(p for p in stack.processes if p.kind == "worker")
        [follower] = follower_pids(worker.pid)
        os.kill(follower, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(worker.pid, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{worker.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                break  # exited, not yet reaped by the stack's launcher
            time.sleep(0.1)
        else:
            pytest.fail("the worker kept running without its follower rank")
    finally:
        stop_stack(tmp_path, grace_s=5.0, quiet=True)
