"""The whole model runner with the Triton backend against the torch backend, and the CUDA-graph
batch padding.

Without CUDA the kernels run in Triton's CPU interpreter (see test_triton_kernels.py for why
TRITON_INTERPRET is set here and left set); with CUDA they run compiled. Both runners get the same
steps (a chunked prefill mixed with a full one, then a chunk with a decode, then pure decodes)
and must give the same logits and greedy tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported; see module docstring
# No skip on ImportError: CI is where these kernels get verified, so a missing Triton fails.
from services.worker.kernels.triton import INTERPRETED  # noqa: E402
from services.worker.kernels.triton.graphs import graph_batch_sizes, padded_batch_size  # noqa: E402
from services.worker.config import parse_config  # noqa: E402
from services.worker.executor import Executor  # noqa: E402
from services.worker.kernels import build_metadata  # noqa: E402
from services.worker.model_runner import ModelRunner  # noqa: E402
from tests.worker.harness import Job, MiniScheduler  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def runners(tiny_model_dir) -> dict[str, ModelRunner]:
    assert INTERPRETED == (DEVICE == "cpu")
    # cuda_graphs off: this compares eager kernels; the graph path is a GPU test.
    return {name: ModelRunner(tiny_model_dir, device=DEVICE, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                              attention_backend=name, cuda_graphs=False)
            for name in ("torch", "triton")}


def test_runner_uses_the_backend_it_was_given(runners: dict[str, ModelRunner]) -> None:
    assert runners["triton"].backend.name == "triton" and runners["torch"].backend.name == "torch"


def test_forward_matches_torch_backend(runners: dict[str, ModelRunner]) -> None:
    vocab = runners["torch"].spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt_a = torch.randint(3, vocab, (40,), generator=gen).tolist()  # prefilled in two chunks
    prompt_b = torch.randint(3, vocab, (6,), generator=gen).tolist()
    tables = [[3, 7, 1], [5]]  # out of order on purpose; block 1 is a real block, 0 the null one
    # (request -> (computed, scheduled)) per step: chunk + full prefill, chunk + decode, decodes.
    steps = [((0, 24), (0, 6)), ((24, 16), (6, 1)), ((40, 1), (7, 1)), ((41, 1), (8, 1))]
    tokens = [prompt_a, prompt_b]
    for step in steps:
        input_ids, positions, rows = [], [], []
        for req, (computed, scheduled) in enumerate(step):
            input_ids += tokens[req][computed : computed + scheduled]
            positions += range(computed, computed + scheduled)
            rows.append(len(input_ids) - 1)
        logits = {}
        for name, runner in runners.items():
            meta = build_metadata([s for _, s in step], [c + s for c, s in step], tables, BLOCK_SIZE, DEVICE)
            as_tensor = lambda values: torch.tensor(values, device=DEVICE)  # noqa: E731
            logits[name] = runner.forward(as_tensor(input_ids), as_tensor(positions), meta, as_tensor(rows))
        # Both float32; the kernels differ from torch's SDPA only in summation order (~1e-6 per
        # attention output), which four layers and the LM head amplify to ~1e-5 on logits.
        torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)
        next_tokens = logits["torch"].argmax(dim=-1).tolist()
        assert logits["triton"].argmax(dim=-1).tolist() == next_tokens
        for req, (computed, scheduled) in enumerate(step):
            if computed + scheduled == len(tokens[req]):  # prompt complete: the sampled token joins
                tokens[req] = tokens[req] + [next_tokens[req]]


def test_greedy_steps_match_torch_backend(runners: dict[str, ModelRunner]) -> None:
    # The executor path: a 16-token budget chunks the 29-token prompt, and the later arrival
    # mixes its prefill with running decodes.
    vocab = runners["torch"].spec.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (29, 5)]
    outputs = {}
    for name, runner in runners.items():
        jobs = [Job("a", prompts[0], 3), Job("b", prompts[1], 3, arrival_step=2)]
        mini = MiniScheduler(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, token_budget=16)
        done = mini.run(Executor(runner).execute, jobs)
        outputs[name] = {rid: job.output_token_ids for rid, job in done.items()}
    assert outputs["triton"] == outputs["torch"]


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(256) == (1, 2, 4, *range(8, 257, 8))
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(6) == (1, 2, 4, 6)
    assert graph_batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


@pytest.mark.parametrize("num_reqs,expected", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16),
                                               (17, 24), (255, 256), (256, 256), (257, None), (0, None)])
def test_padded_batch_size(num_reqs: int, expected: int | None) -> None:
    assert padded_batch_size(num_reqs, graph_batch_sizes(256)) == expected


def test_cuda_graphs_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWITCHYARD_CUDA_GRAPHS", raising=False)
    assert parse_config([]).cuda_graphs is True
    assert parse_config(["--no-cuda-graphs"]).cuda_graphs is False
    monkeypatch.setenv("SWITCHYARD_CUDA_GRAPHS", "0")
    assert parse_config([]).cuda_graphs is False
    assert parse_config(["--cuda-graphs"]).cuda_graphs is True
