"""Unit tests of the worker's sampler: exactness of greedy, penalties and logprobs, the masks of
the filters, the shape of the sampled distribution, and seed reproducibility across batches."""

from __future__ import annotations

import math

import pytest
import torch

from services.worker.sampler import (
    NON_FINITE_LOGITS_ERROR,
    SampledToken,
    Sampler,
    SamplingParams,
    SamplingRow,
    apply_penalties,
)


def make_row(prompt_token_ids: tuple[int, ...] = (1, 2, 3), output_token_ids: tuple[int, ...] = (),
             **params: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), prompt_token_ids, output_token_ids)


def random_logits(batch: int, num_vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, num_vocab, generator=torch.Generator().manual_seed(seed)) * scale


def token_ids(results: list[SampledToken]) -> list[int]:
    return [r.token_id for r in results]


def draw_counts(logits: torch.Tensor, num_draws: int, **params: object) -> torch.Tensor:
    """Counts of each token over many unseeded draws from one logits row, in one batched call."""
    rows = [make_row(**params)] * num_draws
    ids = token_ids(Sampler(seed=1234).sample(logits.expand(num_draws, -1), rows))
    return torch.bincount(torch.tensor(ids), minlength=logits.shape[-1])


def test_greedy_equals_argmax() -> None:
    logits = random_logits(8, 500)
    rows = [make_row(temperature=0.0) for _ in range(8)]
    assert token_ids(Sampler().sample(logits, rows)) == logits.argmax(dim=-1).tolist()


def test_greedy_accepts_half_precision() -> None:
    logits = random_logits(4, 300).to(torch.bfloat16)
    rows = [make_row(temperature=0.0) for _ in range(4)]
    assert token_ids(Sampler().sample(logits, rows)) == logits.float().argmax(dim=-1).tolist()


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = random_logits(8, 500, seed=3)
    greedy = Sampler().sample(logits, [make_row(temperature=0.0) for _ in range(8)])
    top1 = Sampler().sample(logits, [make_row(temperature=1.3, top_k=1) for _ in range(8)])
    assert token_ids(top1) == token_ids(greedy)


def test_seeded_row_is_independent_of_batch_composition() -> None:
    num_vocab = 1000
    flat = random_logits(1, num_vocab, seed=7, scale=0.5)  # wide distribution: a match means something
    others = random_logits(6, num_vocab, seed=8)
    for seed in range(20):
        row = make_row(output_token_ids=(5, 9, 11), seed=seed, top_p=0.95)
        alone = Sampler().sample(flat, [row])[0].token_id
        middle = Sampler().sample(
            torch.cat([others[:2], flat, others[2:3]]),
            [make_row(seed=99), make_row(), row, make_row(temperature=0.0)])[2].token_id
        last = Sampler(seed=5).sample(
            torch.cat([others, flat]), [make_row(top_k=3) for _ in range(6)] + [row])[6].token_id
        assert alone == middle == last


def test_seeded_draws_differ_across_draw_index() -> None:
    logits = torch.zeros(1, 1000)  # uniform: distinct indices should give mostly distinct tokens
    drawn = {Sampler().sample(logits, [make_row(output_token_ids=(0,) * n, seed=42)])[0].token_id
             for n in range(100)}
    assert len(drawn) > 80


def test_unseeded_rows_vary() -> None:
    logits = torch.zeros(1, 1000)
    sampler = Sampler()
    drawn = {sampler.sample(logits, [make_row()])[0].token_id for _ in range(50)}
    assert len(drawn) > 30


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 2}, {0, 1}),
        # probs 0.5, 0.3, 0.12, 0.08: the smallest prefix reaching 0.6 is the first two tokens.
        ({"top_p": 0.6}, {0, 1}),
        # min_p 0.5 keeps tokens with at least half the best probability: 0.5 and 0.3.
        ({"min_p": 0.5}, {0, 1}),
        ({"top_k": 3, "top_p": 0.9}, {0, 1, 2}),
    ],
)
def test_filters_never_pick_masked_tokens(params: dict[str, float], allowed: set[int]) -> None:
    logits = torch.tensor([0.5, 0.3, 0.12, 0.08]).log().unsqueeze(0)
    counts = draw_counts(logits, 5000, **params)
    picked = {i for i, c in enumerate(counts.tolist()) if c}
    assert picked == allowed


def test_filters_never_pick_masked_tokens_with_seeds() -> None:
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, 1.6, 1.5]])
    picked = {Sampler().sample(logits, [make_row(seed=s, top_k=3)])[0].token_id for s in range(300)}
    assert picked == {0, 1, 2}


def test_empirical_distribution_matches_softmax() -> None:
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3]])
    num_draws = 20_000
    counts = draw_counts(logits, num_draws).double()
    expected = torch.softmax(logits[0].double(), dim=-1) * num_draws
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 25.0  # 4 degrees of freedom: p < 1e-4
    assert (counts / num_draws - expected / num_draws).abs().max().item() < 0.015


def test_temperature_sharpens_the_distribution() -> None:
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3]])
    num_draws = 20_000
    counts = draw_counts(logits, num_draws, temperature=0.5).double()
    expected = torch.softmax(logits[0].double() / 0.5, dim=-1)
    assert (counts / num_draws - expected).abs().max().item() < 0.015


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]])
    row = make_row(prompt_token_ids=(0, 1), output_token_ids=(2, 2, 3),
                   repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # Repetition over prompt + output (0, 1, 2, 3): positives halved, negatives doubled.
    # Presence and frequency over output only: token 2 seen twice, token 3 once.
    expected = torch.tensor([[
        2.0 / 2,
        -1.0 * 2,
        0.5 / 2 - 0.5 - 2 * 0.25,
        -3.0 * 2 - 0.5 - 1 * 0.25,
        1.0,
        0.0,
    ]])
    assert torch.equal(apply_penalties(logits, [row]), expected)


def test_penalties_leave_other_rows_untouched() -> None:
    logits = random_logits(3, 50)
    rows = [make_row(), make_row(output_token_ids=(4, 4), frequency_penalty=1.0), make_row()]
    penalised = apply_penalties(logits, rows)
    assert torch.equal(penalised[0], logits[0]) and torch.equal(penalised[2], logits[2])
    assert penalised[1, 4].item() == pytest.approx(logits[1, 4].item() - 2.0)


def test_greedy_uses_penalised_logits() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    plain = make_row(output_token_ids=(0,), temperature=0.0)
    penalised = make_row(output_token_ids=(0,), temperature=0.0, presence_penalty=1.0)
    assert token_ids(Sampler().sample(logits.repeat(2, 1), [plain, penalised])) == [0, 1]


def test_logprobs_are_of_raw_logits_with_sorted_top_n() -> None:
    logits = random_logits(3, 200, seed=11)
    rows = [
        make_row(return_logprobs=True, num_logprobs=5, temperature=0.7, frequency_penalty=1.5,
                 output_token_ids=(1, 2), seed=3),
        make_row(temperature=0.0),
        make_row(return_logprobs=True, num_logprobs=0),
    ]
    results = Sampler().sample(logits, rows)
    reference = torch.log_softmax(logits.double(), dim=-1)
    first = results[0]
    assert first.logprob == pytest.approx(reference[0, first.token_id].item(), abs=1e-6)
    top_values, top_ids = reference[0].topk(5)
    assert list(first.top_token_ids) == top_ids.tolist()
    assert first.top_logprobs == pytest.approx(top_values.tolist(), abs=1e-6)
    assert list(first.top_logprobs) == sorted(first.top_logprobs, reverse=True)
    assert results[1].logprob is None and results[1].top_token_ids == ()
    assert results[2].logprob == pytest.approx(reference[2, results[2].token_id].item(), abs=1e-6)
    assert results[2].top_token_ids == () and results[2].top_logprobs == ()


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_row_fails_alone(poison: float) -> None:
    logits = random_logits(3, 100, seed=2)
    rows = [make_row(seed=1, return_logprobs=True, num_logprobs=2), make_row(seed=2),
            make_row(temperature=0.0)]
    clean = Sampler().sample(logits, rows)
    logits[1, 17] = poison
    results = Sampler().sample(logits, rows)
    assert results[1].token_id == -1 and results[1].error == NON_FINITE_LOGITS_ERROR
    assert results[0] == clean[0] and results[2] == clean[2]
    assert not results[0].error and not results[2].error


def test_negative_infinity_is_a_legitimate_mask() -> None:
    logits = torch.tensor([[-math.inf, 1.0, -math.inf, 0.5]])
    results = Sampler().sample(logits.expand(200, -1), [make_row(seed=s) for s in range(200)])
    assert {r.token_id for r in results} == {1, 3} and not any(r.error for r in results)
    all_masked = Sampler().sample(torch.full((1, 4), -math.inf), [make_row()])[0]
    assert all_masked.token_id == -1 and all_masked.error


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 2.0),
     ("repetition_penalty", 0.0), ("num_logprobs", 21)],
)
def test_impossible_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_mismatched_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(torch.zeros(2, 10), [make_row()])


def test_callers_logits_are_not_modified() -> None:
    logits = random_logits(2, 50)
    logits[1, 3] = math.nan
    before = logits.clone()
    rows = [make_row(output_token_ids=(1, 1), repetition_penalty=1.5, frequency_penalty=1.0,
                     temperature=0.9, top_p=0.8, min_p=0.1)] * 2
    Sampler().sample(logits, rows)
    assert torch.allclose(logits, before, rtol=0.0, atol=0.0, equal_nan=True)
