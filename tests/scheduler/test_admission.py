"""Admission of a resumed request: the tokens a front door already streamed come back with the
prompt when it resubmits the request to another scheduler, and admission checks them like any
other client field before they reach a worker."""

from __future__ import annotations

import pytest

from services.scheduler.admission import ModelLimits, Submission, build_request
from shared.errors import InvalidArgument
from shared.sampling_rules import SamplingFields

LIMITS = ModelLimits(max_model_len=256, vocab_size=100, max_tokens_per_request=1024)


def submission(resumed: tuple[int, ...], max_tokens: int = 8, **kw) -> Submission:
    return Submission("r1", (5, 6, 7), SamplingFields(max_tokens=max_tokens, temperature=0.0),
                      resume_output_token_ids=resumed, **kw)


@pytest.mark.parametrize("bad", [100, -1, 10**6])
def test_resumed_ids_outside_the_vocabulary_are_refused_naming_the_field(bad: int) -> None:
    with pytest.raises(InvalidArgument) as refused:
        build_request(submission((3, bad)), LIMITS, now_s=0.0)
    assert refused.value.field == "resume_output_token_ids"
    assert str(bad) in str(refused.value) and "[0, 100)" in str(refused.value)


@pytest.mark.parametrize("num_resumed", [8, 9])
def test_resuming_with_nothing_left_of_max_tokens_is_refused(num_resumed: int) -> None:
    with pytest.raises(InvalidArgument) as refused:
        build_request(submission(tuple(range(10, 10 + num_resumed)), max_tokens=8), LIMITS, now_s=0.0)
    assert refused.value.field == "resume_output_token_ids"
    assert "max_tokens (8)" in str(refused.value)


def test_a_valid_resume_starts_from_the_streamed_tokens_and_keeps_max_tokens() -> None:
    resumed = (11, 12, 13, 14, 15, 16, 17)  # one short of max_tokens: one token left to generate
    request = build_request(submission(resumed, max_tokens=8, timeout_s=2.5), LIMITS, now_s=100.0)
    assert request.output_token_ids == list(resumed)
    assert request.prompt_token_ids == [5, 6, 7]
    assert request.max_tokens == 8  # resumed tokens count against it; it is not shortened again
    assert request.all_token_ids == [5, 6, 7, *resumed]  # what the worker recomputes the KV of
    assert request.num_prompt_tokens == 3  # usage still counts the client's prompt only
    assert request.deadline_s == pytest.approx(102.5)  # the remaining deadline the front door sent


def test_the_output_list_is_the_requests_own() -> None:
    # The request appends to its output as tokens come; the submission stays as it was sent.
    sub = submission((11, 12))
    request = build_request(sub, LIMITS, now_s=0.0)
    request.output_token_ids.append(13)
    assert sub.resume_output_token_ids == (11, 12)
    assert build_request(sub, LIMITS, now_s=0.0).output_token_ids == [11, 12]


def test_a_request_without_resume_starts_empty() -> None:
    request = build_request(submission(()), LIMITS, now_s=0.0)
    assert request.output_token_ids == [] and request.max_tokens == 8
