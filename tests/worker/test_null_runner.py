"""The null model: the worker pipeline with the model's cost taken out (`--null-model`)."""

from __future__ import annotations

import pytest
from switchyard.worker.v1 import worker_pb2 as pb

from services.worker.config import parse_config
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.null_runner import NullModelRunner, next_token
from services.worker.servicer import WorkerServicer
from services.worker.step import CachedRequestData, NewRequestData, StepInput
from shared.errors import InvalidArgument
from tests.worker.harness import GREEDY, Job, MiniScheduler


@pytest.fixture(scope="module")
def null_runner(tiny_model_dir) -> NullModelRunner:
    return NullModelRunner(tiny_model_dir, num_blocks=64, block_size=16)


def expected_tokens(prompt: list[int], n: int, vocab_size: int) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = next_token(last, vocab_size)
        out.append(last)
    return out


def test_spec_and_pool_shape_match_the_real_model(tiny_model_dir) -> None:
    budget = 2**20
    real = ModelRunner(tiny_model_dir, kv_cache_bytes=budget, block_size=16)
    null = NullModelRunner(tiny_model_dir, kv_cache_bytes=budget, block_size=16)
    assert null.spec == real.spec
    assert (null.num_blocks, null.block_size) == (real.num_blocks, real.block_size)
    assert null.kv_pool.shape == real.kv_pool.shape and null.kv_pool.layers == []  # no KV memory held
    assert null.backend.name == "null" and null.device == real.device
    assert [null.kv_pool.is_valid_block(b) for b in (0, 1, null.num_blocks - 1, null.num_blocks)] == [
        False, True, True, False]


def test_executor_produces_the_deterministic_tokens(null_runner: NullModelRunner) -> None:
    vocab = null_runner.spec.vocab_size
    prompts = [[5], [7, 8, 9], list(range(100, 140)), [vocab - 2, vocab - 1], list(range(200, 290))]
    jobs = [Job(f"r{i}", p, 6, GREEDY, arrival_step=i) for i, p in enumerate(prompts)]
    mini = MiniScheduler(block_size=null_runner.block_size, num_blocks=null_runner.num_blocks, token_budget=32)
    done = mini.run(Executor(null_runner).execute, jobs)
    assert done["r4"].num_prefill_steps >= 3, "the 90-token prompt was not chunked"
    for i, prompt in enumerate(prompts):
        assert done[f"r{i}"].output_token_ids == expected_tokens(prompt, 6, vocab), f"prompt {i}"
    assert done["r3"].output_token_ids[0] == 0  # wraps around the vocabulary


def test_forward_logits_are_float32_rows_with_one_winner(null_runner: NullModelRunner) -> None:
    import torch  # noqa: PLC0415

    ids = torch.tensor([3, 4, 5, null_runner.spec.vocab_size - 1])
    logits = null_runner.forward(ids, torch.arange(4), None, torch.tensor([1, 3]))
    assert logits.dtype == torch.float32 and logits.shape == (2, null_runner.spec.vocab_size)
    assert logits.argmax(dim=-1).tolist() == [5, 0]
    assert (logits > 0).sum().item() == 2


def _new(request_id: str, prompt: tuple[int, ...], blocks: tuple[int, ...], n: int) -> NewRequestData:
    return NewRequestData(request_id, prompt, (), GREEDY, blocks, 0, n)


def test_validation_still_refuses_bad_steps(null_runner: NullModelRunner) -> None:
    executor = Executor(null_runner)
    vocab, num_blocks = null_runner.spec.vocab_size, null_runner.num_blocks
    bad_steps = {
        "block outside the pool": StepInput(1, new_requests=(_new("a", (1, 2), (num_blocks,), 2),)),
        "the null block": StepInput(1, new_requests=(_new("a", (1, 2), (0,), 2),)),
        "too few blocks": StepInput(1, new_requests=(_new("a", tuple(range(1, 40)), (1,), 39),)),
        "token outside the vocabulary": StepInput(1, new_requests=(_new("a", (1, vocab), (1,), 2),)),
        "unknown cached request": StepInput(1, cached_requests=(CachedRequestData("ghost", (), 1),)),
        "more tokens than it has": StepInput(1, new_requests=(_new("a", (1, 2), (1,), 3),)),
    }
    for label, step in bad_steps.items():
        with pytest.raises(InvalidArgument):
            executor.execute(step)
        assert executor.requests == {}, f"{label}: a refused step changed state"
    # A good step, then one that disagrees about its computed count: refused, state unchanged.
    result = executor.execute(StepInput(1, new_requests=(_new("a", (1, 2), (1,), 2),)))
    assert [o.token_ids for o in result.outputs] == [(3,)]
    with pytest.raises(InvalidArgument):
        executor.execute(StepInput(2, cached_requests=(CachedRequestData("a", (), 1, num_computed_tokens=1),)))
    assert executor.requests["a"].num_computed_tokens == 2
    result = executor.execute(StepInput(3, cached_requests=(CachedRequestData("a", (), 1, num_computed_tokens=2),)))
    assert [o.token_ids for o in result.outputs] == [(4,)]


def test_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWITCHYARD_NULL_MODEL", raising=False)
    assert parse_config([]).null_model is False
    assert parse_config(["--null-model"]).null_model is True
    monkeypatch.setenv("SWITCHYARD_NULL_MODEL", "1")
    assert parse_config([]).null_model is True
    assert parse_config(["--no-null-model"]).null_model is False


async def test_info_reports_the_null_backend(null_runner: NullModelRunner) -> None:
    servicer = WorkerServicer(Executor(null_runner), version="v-null", address="null-test")
    info = await servicer.Info(pb.InfoRequest(), None)
    assert info.attention_backend == "null"
    assert (info.vocab_size, info.max_model_len, info.num_blocks) == (
        null_runner.spec.vocab_size, null_runner.spec.max_model_len, null_runner.num_blocks)
    assert list(info.eos_token_ids) == list(null_runner.spec.eos_token_ids)


def test_a_request_whose_sampling_failed_is_skipped_by_a_step_planned_ahead(
        null_runner: NullModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    # With async scheduling the scheduler plans step 2 before it reads step 1's reply, so step 2
    # may still decode a request whose sampling failed in step 1: the worker skips it rather than
    # refusing the whole step (which would fail every other request in it).
    executor = Executor(null_runner)
    forward = null_runner.forward

    def poison_first_row(*args: object) -> object:
        logits = forward(*args).clone()  # an inference tensor is read-only outside inference mode
        logits[0] = float("nan")
        return logits

    monkeypatch.setattr(null_runner, "forward", poison_first_row)
    first = executor.execute(StepInput(1, new_requests=(_new("bad", (1, 2), (1,), 2), _new("ok", (5, 6), (2,), 2))))
    assert [(o.request_id, o.token_ids, bool(o.error)) for o in first.outputs] == [("bad", (), True), ("ok", (7,), False)]
    monkeypatch.setattr(null_runner, "forward", forward)
    ahead = executor.execute(StepInput(2, cached_requests=(CachedRequestData("bad", (), 1, num_computed_tokens=2),
                                                           CachedRequestData("ok", (), 1, num_computed_tokens=2))))
    assert [(o.request_id, o.token_ids) for o in ahead.outputs] == [("ok", (8,))]
    executor.execute(StepInput(3, finished_request_ids=("bad",)))
    assert set(executor.requests) == {"ok"}
