"""`tensor_parallel` (letter m): one worker split across two ranks against the same worker whole.

The small test model (~96M parameters, 12 heads / 4 KV heads, float32; SmolLM2's 9 heads do not
split two ways) on one worker, 64 requests of 128/64 tokens at 16 concurrent: `--tensor-parallel-size 1` with both cores' threads against `--tensor-parallel-size 2`
with one thread per rank, each on a fresh stack. On a 2-core CPU the split cannot win: both ranks
share the cores the unsplit worker already used, and every layer adds two all-reduces over gloo's
loopback TCP (hidden size 768, a few KiB per decode step each); what it shows is the price of the split.
On GPUs the same flags split a model across cards (NCCL instead of gloo in parallel.init_group):

    python -m services.worker --device cuda --tensor-parallel-size 2 ...
    python -m bench.run --scenarios tensor_parallel   # with SWITCHYARD_DEVICE=cuda in the workers' env
"""

from __future__ import annotations

import asyncio
from typing import Callable

from bench.clients import run_grpc
from bench.report import ScenarioResult
from bench.scenarios import Options, running_stack, vocab_size
from bench.workload import random_workload


def tensor_parallel(o: Options, r: ScenarioResult) -> None:
    model = o.model("small")
    w = random_workload("tensor_parallel", num_requests=o.pick(64, 8), prompt_len=o.pick((128, 128), (16, 16)),
                        output_len=o.pick((64, 64), (8, 8)), vocab_size=vocab_size(model),
                        concurrency=o.pick(16, 4), seed=3)
    runs = {"tp1": ("--tensor-parallel-size", "1", "--num-threads", "2"),
            "tp2": ("--tensor-parallel-size", "2", "--num-threads", "1")}
    r.config.update(model=model.name, workload=w.params, worker_args={k: list(v) for k, v in runs.items()})
    for key, args in runs.items():
        with running_stack(model, worker_args=(*args, "--dtype", "float32")) as stack:
            records, duration_s = asyncio.run(run_grpc(stack.tokenizer_address, w, label=key))
        r.add_run(key, records, duration_s)
    # Recorded, not expected to pass on 2 cores (see the module doc).
    r.target("TP=2 / TP=1 output throughput (2 CPU cores)", r.ratio("tp2/tp1", "tp2", "tp1"), ">=", 1.0, "x")


SCENARIOS: dict[str, tuple[Callable[[Options, ScenarioResult], None], str]] = {
    "tensor_parallel": (tensor_parallel, "Small model (~96M) on one worker, whole (TP=1, 2 threads) vs split "
                        "across two ranks (TP=2, 1 thread each): output throughput on this machine."),
}
