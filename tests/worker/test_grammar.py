"""Constrained decoding across the scheduler core and the worker core (tests/worker/serve.py): the
output of a constrained request always parses and validates, whatever the model (the tiny model's
weights are random, so nothing but the mask keeps it inside the grammar); unconstrained neighbours
are untouched; speculation skips constrained requests; preemption and resumption rebuild the
grammar state from the tokens so far; a grammar the worker cannot use fails its request alone."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from services.scheduler.request import FinishReason, Request
from services.tokenizer.api_types import ResponseFormat
from services.tokenizer.structured_output import grammar_for
from services.worker.model_runner import ModelRunner
from services.worker.sampler import Sampler, SamplingRow, apply_token_masks
from shared.hf_tokenizer import load_tokenizer
from shared.sampling_rules import SamplingParams
from tests.worker.serve import serve

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=1.0, seed=11)
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "boolean"}},
                                            "required": ["x"], "additionalProperties": False},
                                      "q": {"type": "null"}},
     "required": ["p", "q"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "v": {"enum": [1, 2, 3]}},
     "required": ["kind", "v"], "additionalProperties": False},
]


def grammar(schema: dict) -> str:
    return grammar_for(ResponseFormat("json_schema", json.dumps(schema)))


@pytest.fixture(scope="module")
def runner(tiny_model_dir) -> ModelRunner:
    return ModelRunner(tiny_model_dir, num_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def prompts(vocab_size: int, num: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randrange(5, 30))] for _ in range(num)]


def constrained(prompt: list[int], schema: dict, sampling: SamplingParams, rid: str, max_tokens: int = 80) -> Request:
    return Request(rid, list(prompt), sampling, max_tokens, grammar=grammar(schema))


def check_valid(request: Request, schema: dict, tokenizer) -> None:
    assert request.finish_reason is FinishReason.STOP, (request.request_id, request.finish_reason)
    text = tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_constrained_output_validates_and_free_neighbours_are_untouched(runner, tokenizer, sampling) -> None:
    # The last free prompt repeats one token: the tiny model loops on it, so drafts are proposed.
    ps = prompts(runner.spec.vocab_size, 2 * len(SCHEMAS)) + [[777] * 16]
    free_alone = [Request(f"f{i}", list(p), GREEDY, 12) for i, p in enumerate(ps[len(SCHEMAS):])]
    serve(runner, free_alone)
    cons = [constrained(p, s, sampling, f"c{i}") for i, (p, s) in enumerate(zip(ps, SCHEMAS))]
    free = [Request(f"f{i}", list(p), GREEDY, 12) for i, p in enumerate(ps[len(SCHEMAS):])]
    # With speculation on: the worker refuses a step with drafts for a constrained request, so
    # this run also shows the scheduler proposes none for them.
    batcher = serve(runner, cons + free, num_speculative_tokens=4)
    for request, schema in zip(cons, SCHEMAS):
        check_valid(request, schema, tokenizer)
    for alone, mixed in zip(free_alone, free):
        assert alone.output_token_ids == mixed.output_token_ids, alone.request_id
    assert batcher.speculation.num_draft_tokens_total > 0, "speculation was not exercised"


def test_json_object_on_random_weights_is_an_object(runner, tokenizer) -> None:
    g = grammar_for(ResponseFormat("json_object"))
    ps = prompts(runner.spec.vocab_size, 3)
    # Free-form objects can nest without end on random weights: a length finish is allowed, but
    # whatever stopped must parse as an object.
    requests = [Request(f"o{i}", p, SamplingParams(temperature=1.0, seed=i), 120, grammar=g) for i, p in enumerate(ps)]
    serve(runner, requests)
    for r in requests:
        if r.finish_reason is FinishReason.STOP:
            assert isinstance(json.loads(tokenizer.decode(r.output_token_ids, skip_special_tokens=True)), dict)
        else:
            assert r.finish_reason is FinishReason.LENGTH


def test_resumed_and_preempted_requests_continue_the_grammar(runner, tokenizer) -> None:
    """A request resumed with tokens already streamed (failover) or preempted and recomputed gets a
    matcher rebuilt from those tokens; greedy output is then the uninterrupted one."""
    schema = SCHEMAS[0]
    [prompt] = prompts(runner.spec.vocab_size, 1)
    whole = constrained(prompt, schema, GREEDY, "whole")
    serve(runner, [whole])
    check_valid(whole, schema, tokenizer)
    cut = len(whole.output_token_ids) // 2
    resumed = constrained(prompt, schema, GREEDY, "resumed")
    resumed.output_token_ids = list(whole.output_token_ids[:cut])  # as admission does for resume_output_token_ids
    serve(runner, [resumed])
    assert resumed.output_token_ids == whole.output_token_ids

    # Few blocks and long distinct prompts (no shared prefix): the batcher must preempt some of them.
    ps = [p * 3 for p in prompts(runner.spec.vocab_size, 6)]
    alone = [constrained(p, schema, GREEDY, f"a{i}") for i, p in enumerate(ps)]
    serve(runner, alone)
    crowded = [constrained(p, schema, GREEDY, f"c{i}") for i, p in enumerate(ps)]
    num_blocks = 1 + 2 * (-(-(max(map(len, ps)) + 40) // runner.block_size))
    serve(runner, crowded, num_blocks=num_blocks)
    assert sum(r.num_preemptions for r in crowded) > 0, "the test needs preemption to happen"
    for a, c in zip(alone, crowded):
        check_valid(c, schema, tokenizer)
        assert c.output_token_ids == a.output_token_ids, c.request_id


def test_a_grammar_the_worker_cannot_bind_fails_its_request_alone(runner) -> None:
    ps = prompts(runner.spec.vocab_size, 2)
    bad = Request("bad", ps[0], GREEDY, 8, grammar='{"grammars": [{"json_schema": {"type": "objectx"}}]}')
    good = Request("good", ps[1], GREEDY, 8)
    serve(runner, [bad, good])
    assert bad.finish_reason is FinishReason.ABORT and not bad.output_token_ids
    assert good.finish_reason is FinishReason.LENGTH and len(good.output_token_ids) == 8


def test_masked_tokens_are_never_drawn_and_unmasked_rows_pay_nothing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[[7, 9, 42]] = True
    rows = [SamplingRow(SamplingParams(temperature=1.0, seed=s), [1], [], mask if s != 1 else None) for s in range(3)]
    masked = apply_token_masks(logits, rows)
    assert torch.equal(masked[1], logits[1])
    assert torch.isinf(masked[0][~mask]).all() and torch.equal(masked[0][mask], logits[0][mask])
    plain = [SamplingRow(SamplingParams(temperature=1.0), [1], [])] * 3
    assert apply_token_masks(logits, plain) is logits
    sampler = Sampler(seed=1)
    for draw in range(200):
        rows = [SamplingRow(SamplingParams(temperature=2.0, seed=draw), [1], [0] * draw, mask)]
        assert sampler.sample(logits[:1], rows)[0].token_id in (7, 9, 42)
    # A mask narrower than the logits (a padded vocabulary) allows nothing past its width.
    narrow = apply_token_masks(logits, [SamplingRow(GREEDY, [1], [], torch.ones(40, dtype=torch.bool))] * 3)
    assert torch.isinf(narrow[:, 40:]).all() and torch.equal(narrow[:, :40], logits[:, :40])
