"""Draft verification on the worker: the acceptance rule, its distribution (speculative rejection
sampling against a deterministic draft), and the Executor's checks of steps with drafts."""

from __future__ import annotations

import pytest
import torch

from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.sampler import SampledToken, Sampler, SamplingParams, SamplingRow, filtered_probs
from services.worker.speculation import accepted, draft_rows
from services.worker.step import CachedRequestData, NewRequestData, StepInput
from shared.errors import InvalidArgument
from tests.worker.harness import GREEDY


def tokens(*ids: int) -> list[SampledToken]:
    return [SampledToken(t, None, (), ()) for t in ids]


def test_keeps_samples_up_to_the_first_that_differs_from_its_draft() -> None:
    assert [t.token_id for t in accepted(tokens(5, 6, 7), (5, 6))] == [5, 6, 7]  # all drafts and the bonus
    assert [t.token_id for t in accepted(tokens(5, 9, 7), (5, 6))] == [5, 9]  # 6 rejected: 9 drawn instead
    assert [t.token_id for t in accepted(tokens(4, 6, 7), (5, 6))] == [4]
    assert [t.token_id for t in accepted(tokens(4), ())] == [4]
    failed = [SampledToken(-1, None, (), (), error="non-finite logits")]
    assert accepted(tokens(5) + failed, (5,))[0].token_id == 5 and len(accepted(tokens(5) + failed, (5,))) == 1
    assert accepted(failed + tokens(5), (5,)) == []


def test_each_row_sees_the_drafts_before_it_as_generated() -> None:
    row = SamplingRow(GREEDY, (1, 2), (3,))
    assert [list(r.output_token_ids) for r in draft_rows(row, (7, 8))] == [[3], [3, 7], [3, 7, 8]]


# Chi-square critical values at p = 0.001, by degrees of freedom: a correct sampler fails 1 run in 1000.
_CHI2_999 = {4: 18.47, 5: 20.52}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = probs > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_accepts_a_draft_with_its_target_probability_and_else_draws_from_the_residual() -> None:
    num_seeds, draft = 6000, 1
    logits = torch.tensor([2.0, 1.6, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = [SamplingParams(temperature=0.8, top_k=6, top_p=0.99, seed=seed) for seed in range(num_seeds)]
    target = filtered_probs(logits[None], params[:1])[0]  # after temperature, top-k and top-p
    assert int((target > 0).sum()) == 6
    # As the executor does it: a row after the last token and one after the draft, per request.
    rows = [r for p in params for r in draft_rows(SamplingRow(p, (3, 4), (5, 6)), (draft,))]
    sampled = Sampler().sample(logits.expand(len(rows), -1), rows)
    kept = [accepted(sampled[2 * i:2 * i + 2], (draft,)) for i in range(num_seeds)]
    ids = torch.tensor([k[0].token_id for k in kept])
    assert all((len(k) == 2) == (k[0].token_id == draft) for k in kept)  # accepted: the bonus follows
    accept_rate = sum(len(k) == 2 for k in kept) / num_seeds
    p_draft = float(target[draft])
    assert abs(accept_rate - p_draft) < 4 * (p_draft * (1 - p_draft) / num_seeds) ** 0.5, (accept_rate, p_draft)
    rejected = ids[ids != draft]
    residual = target.clone()
    residual[draft] = 0
    residual /= residual.sum()
    counts = torch.bincount(rejected, minlength=len(logits)).float()
    assert counts[target == 0].sum() == 0, "a masked token was drawn"
    assert chi_square(counts, residual) < _CHI2_999[4]
    # Together: the token at this position follows the target distribution.
    assert chi_square(torch.bincount(ids, minlength=len(logits)).float(), target) < _CHI2_999[5]
    # And the draws are reproducible by (seed, position).
    again = Sampler().sample(logits.expand(len(rows), -1), rows)
    assert [s.token_id for s in again] == [s.token_id for s in sampled]


@pytest.fixture(scope="module")
def runner(tiny_model_dir) -> ModelRunner:
    return ModelRunner(tiny_model_dir, num_blocks=64, block_size=4)


def test_steps_with_bad_drafts_are_refused_whole(runner: ModelRunner) -> None:
    executor = Executor(runner)
    executor.execute(StepInput(1, (NewRequestData("r", (5, 6, 7), (), GREEDY, (1,), 0, 3),)))
    held = executor.requests["r"]
    num_tokens = held.num_tokens  # 4: the prompt and its first token
    cases = {
        "outside the vocabulary": CachedRequestData("r", (2,), 2, 3, (runner.spec.vocab_size,)),
        "not all drafts computed": CachedRequestData("r", (2,), 2, 3, (8, 9)),
        "more than the drafts": CachedRequestData("r", (2,), 4, 3, (8, 9)),
    }
    for why, bad in cases.items():
        with pytest.raises(InvalidArgument, match="draft_token_ids"):
            executor.execute(StepInput(2, (), (bad,)))
        assert executor.requests["r"].num_tokens == num_tokens and executor.requests["r"].num_computed_tokens == 3, why


def test_a_step_with_drafts_keeps_the_table_of_the_kept_tokens(runner: ModelRunner) -> None:
    executor = Executor(runner)
    executor.execute(StepInput(1, (NewRequestData("r", (5, 6, 7), (), GREEDY, (1,), 0, 3),)))
    first = executor.requests["r"].output_token_ids[0]
    # Drafts that the model almost surely rejects at once: only the first draw is kept.
    wrong = (runner.spec.vocab_size - 1,) * 6
    [result] = executor.execute(StepInput(2, (), (CachedRequestData("r", (2, 3), 7, 3, wrong),))).outputs
    state = executor.requests["r"]
    assert len(result.token_ids) == 1 and state.output_token_ids == [first, result.token_ids[0]]
    assert state.num_computed_tokens == state.num_tokens - 1 == 4
    assert state.block_ids == [1]  # 4 computed tokens fill block 1; blocks 2 and 3 held only drafts
    assert state.draft_token_ids == ()
