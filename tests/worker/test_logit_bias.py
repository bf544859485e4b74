"""logit_bias below the front door: the sampler adds it for the rows that have it only, the Step
contract carries it, and the scheduler's admission checks it against the vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from services.scheduler import wire as scheduler_wire
from services.scheduler.admission import ModelLimits, Submission, build_request
from services.worker import wire as worker_wire
from services.worker.sampler import Sampler, SamplingParams, SamplingRow, apply_logit_bias
from shared.errors import InvalidArgument
from shared.sampling_rules import SamplingFields


def row(**params: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), (1, 2, 3), ())


def logits(batch: int = 3, num_vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, num_vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_plus_100_forces_a_token_under_greedy_and_sampling() -> None:
    x = logits()
    target = int(x[0].argmin())  # the least likely token of row 0
    greedy = Sampler().sample(x, [row(temperature=0.0, logit_bias=((target, 100.0),)),
                                  row(temperature=0.0), row(temperature=0.0)])
    assert greedy[0].token_id == target
    # The other rows are untouched: plain argmax.
    assert [t.token_id for t in greedy[1:]] == x[1:].argmax(dim=-1).tolist()
    sampled = Sampler(seed=7).sample(x[:1].expand(64, -1), [row(temperature=1.0, logit_bias=((target, 100.0),))] * 64)
    assert {t.token_id for t in sampled} == {target}


def test_minus_100_bans_a_token() -> None:
    x = logits(batch=1)
    best = int(x[0].argmax())
    [greedy] = Sampler().sample(x, [row(temperature=0.0, logit_bias=((best, -100.0),))])
    assert greedy.token_id != best
    assert greedy.token_id == int(x[0].topk(2).indices[1])  # the runner-up wins
    # Sampling at a high temperature never draws it either.
    peaked = torch.zeros(1, 50)
    peaked[0, best] = 20.0
    draws = Sampler(seed=3).sample(peaked.expand(256, -1), [row(temperature=1.5, logit_bias=((best, -100.0),))] * 256)
    assert best not in {t.token_id for t in draws}


def test_rows_without_bias_pass_through_untouched() -> None:
    x = logits()
    assert apply_logit_bias(x, [row(), row(), row()]) is x  # no copy when nobody asks
    biased = apply_logit_bias(x, [row(), row(logit_bias=((4, 2.5), (49, -1.0))), row()])
    assert torch.equal(biased[0], x[0]) and torch.equal(biased[2], x[2])
    expected = x[1].clone()
    expected[4] += 2.5
    expected[49] -= 1.0
    assert torch.equal(biased[1], expected)
    assert torch.equal(x, logits())  # the input is never modified


def test_bias_comes_before_penalties_and_logprobs_stay_raw() -> None:
    x = torch.zeros(1, 10)
    x[0, 3] = 1.0
    # Token 5 gets +2 (logit 2); a presence penalty of 2 on it (already generated) brings it to 0,
    # below token 3, only if the bias is applied first and the penalty after.
    params = SamplingParams(temperature=0.0, logit_bias=((5, 2.0),), presence_penalty=2.0, return_logprobs=True)
    [token] = Sampler().sample(x, [SamplingRow(params, (1,), (5,))])
    assert token.token_id == 3
    assert token.logprob == pytest.approx(float(torch.log_softmax(x, dim=-1)[0, 3]))


def test_ids_past_the_logits_width_are_skipped() -> None:
    x = logits(batch=1, num_vocab=8)
    assert torch.equal(apply_logit_bias(x, [row(logit_bias=((100, 5.0),))]), x)


def test_non_finite_bias_is_refused_by_the_params() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, math.inf),))


def test_the_step_contract_carries_the_bias_both_ways() -> None:
    params = SamplingParams(temperature=0.5, seed=3, logit_bias=((2, -100.0), (7, 1.5)))
    on_wire = scheduler_wire._sampling_to_worker(params)
    assert dict(on_wire.logit_bias) == {2: -100.0, 7: 1.5}
    assert worker_wire.sampling_from_pb(on_wire) == params
    assert worker_wire.sampling_from_pb(worker_wire.sampling_to_pb(params)) == params
    assert worker_wire.sampling_from_pb(scheduler_wire._sampling_to_worker(SamplingParams())).logit_bias == ()


LIMITS = ModelLimits(max_model_len=256, vocab_size=100, max_tokens_per_request=1024)


def submit(bias: tuple[tuple[int, float], ...]):
    return build_request(Submission("r1", (5, 6, 7), SamplingFields(max_tokens=4, logit_bias=bias)), LIMITS, 0.0)


@pytest.mark.parametrize("bias,quoted", [
    (((100, 1.0),), "[0, 100)"), (((-1, 1.0),), "[0, 100)"),
    (((5, 100.5),), "[-100, 100]"), (((5, -101.0),), "[-100, 100]"), (((5, math.nan),), "[-100, 100]"),
])
def test_admission_refuses_bad_ids_and_values_naming_the_field(bias, quoted) -> None:
    with pytest.raises(InvalidArgument) as refused:
        submit(bias)
    assert refused.value.field == "sampling.logit_bias" and quoted in str(refused.value)


def test_admission_passes_the_bias_to_the_worker_sampling() -> None:
    assert submit(((3, -100.0), (99, 100.0))).sampling.logit_bias == ((3, -100.0), (99, 100.0))
    assert submit(()).sampling.logit_bias == ()
