"""n > 1 through the whole in-process stack: choices with their index over HTTP (the official `openai`
client, streaming and not) and gRPC, usage that counts every sequence, derived seeds, the prompt's
blocks computed once and shared, and every block back after a finish or an abort."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing

import grpc
import openai
import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb

from services.tokenizer.frontend import sequence_seed

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Say something."}]
IGNORE_EOS = {"extra_body": {"ignore_eos": True}}


async def blocks_in_use(stack) -> int:
    stats = await stack.stub.GetStats(sched_pb.GetStatsRequest())
    return sum(w.num_blocks_used for w in stats.workers)


async def settled(stack, within_s: float = 10.0) -> bool:
    """Whether every request left the scheduler and every KV block came back within the time."""
    for _ in range(int(within_s / 0.05)):
        if not stack.fleet.live and await blocks_in_use(stack) == 0:
            return True
        await asyncio.sleep(0.05)
    return False


def num_prompt_tokens(stack, prompt: str = PROMPT) -> int:
    return len(stack.frontend.tokenize(prompt))


async def test_sequence_seeds_are_derived_reproducible_and_distinct() -> None:
    assert sequence_seed(None, 3) is None and sequence_seed(42, 0) == 42
    seeds = [sequence_seed(42, i) for i in range(16)]
    assert seeds == [sequence_seed(42, i) for i in range(16)] and len(set(seeds)) == 16
    assert all(-(1 << 63) <= s < (1 << 63) for s in seeds)
    assert sequence_seed(43, 1) != sequence_seed(42, 1)


async def test_greedy_n3_gives_three_identical_choices_and_usage_adds_up(stack, client) -> None:
    whole = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0.0, n=3,
                                            **IGNORE_EOS)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.text for c in whole.choices}) == 1 and whole.choices[0].text
    assert all(c.finish_reason == "length" for c in whole.choices)
    single = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0.0,
                                             **IGNORE_EOS)
    assert whole.choices[0].text == single.choices[0].text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (num_prompt_tokens(stack), 24)
    assert whole.usage.total_tokens == num_prompt_tokens(stack) + 24
    chat = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=5, temperature=0.0,
                                                n=2, **IGNORE_EOS)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message
    assert chat.usage.completion_tokens == 10
    assert await settled(stack)


async def test_seeded_n3_differs_per_choice_and_repeats(client) -> None:
    args = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 11, **IGNORE_EOS}
    first = await client.completions.create(n=3, **args)
    again = await client.completions.create(n=3, **args)
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 3
    assert [c.text for c in again.choices] == texts
    # Sequence 0 keeps the request's own seed: choice 0 is the n=1 answer.
    assert (await client.completions.create(**args)).choices[0].text == texts[0]


async def test_streamed_choices_carry_their_index(stack, client) -> None:
    args = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 5,
            "n": 3, **IGNORE_EOS}
    whole = await client.completions.create(**args)
    stream = await client.completions.create(stream=True, stream_options={"include_usage": True}, **args)
    chunks = [c async for c in stream]
    texts, finishes = ["", "", ""], [[], [], []]
    for chunk in chunks[:-1]:
        [part] = chunk.choices
        texts[part.index] += part.text
        finishes[part.index].append(part.finish_reason)
    assert texts == [c.text for c in whole.choices]
    assert all(f[-1] == "length" and f.count("length") == 1 for f in finishes)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == num_prompt_tokens(stack)

    chat = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=4, temperature=0.0,
                                                n=2, stream=True, **IGNORE_EOS)
    chat_chunks = [c async for c in chat]
    roles = [c.choices[0].index for c in chat_chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    contents = ["", ""]
    for chunk in chat_chunks:
        contents[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert contents[0] == contents[1] and contents[0]


async def test_grpc_responses_say_which_sequence(stack) -> None:
    req = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=6, temperature=0.0, n=3,
                                                                       ignore_eos=True))
    responses = [r async for r in stack.api.Generate(req, timeout=60)]
    ids: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for r in responses:
        ids[r.index].extend(r.token_ids)
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 6
    finals = [r for r in responses if r.finish_reason]
    assert sorted(r.index for r in finals) == [0, 1, 2]
    assert [r.HasField("usage") for r in responses].count(True) == 1 and responses[-1].HasField("usage")
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (num_prompt_tokens(stack), 18)


async def test_sequences_share_the_prompts_full_blocks(stack, monkeypatch) -> None:
    # A prefix never seen before, several blocks long: the first sequence computes it, the others
    # wait for it on the same worker and hit it in the prefix cache.
    prompt = f"{uuid.uuid4().hex} " + "a shared prompt spanning several KV blocks " * 8
    num_prompt = num_prompt_tokens(stack, prompt)
    cached: dict[str, int] = {}
    original = stack.frontend.scheduler.stream

    async def spy(request_id, prompt_token_ids, inp, trace_context=None):
        async with aclosing(original(request_id, prompt_token_ids, inp, trace_context)) as events:
            async for event in events:
                cached[request_id] = max(cached.get(request_id, 0), event.num_cached_tokens)
                yield event

    monkeypatch.setattr(stack.frontend.scheduler, "stream", spy)
    req = pb.GenerateRequest(request_id="shared", prompt=prompt,
                             sampling=pb.SamplingParams(max_tokens=4, temperature=0.0, n=3, ignore_eos=True))
    responses = [r async for r in stack.api.Generate(req, timeout=60)]
    assert {r.request_id for r in responses} == {"shared"}
    full_blocks = (num_prompt - 1) // 16 * 16  # the last prompt token is always computed
    assert full_blocks >= 48
    assert sorted(cached.values()) == [0, full_blocks, full_blocks], (cached, num_prompt)
    assert responses[-1].usage.cached_tokens in (0, full_blocks)  # as sequence 0 saw it
    assert await settled(stack)


async def test_abort_stops_every_sequence_and_frees_every_block(stack, client) -> None:
    req = pb.GenerateRequest(prompt="cancel me " * 20, sampling=pb.SamplingParams(max_tokens=1000, n=3,
                                                                                  temperature=1.0, ignore_eos=True))
    call = stack.api.Generate(req)
    seen = set()
    async for response in call:
        seen.add(response.index)
        if len(seen) == 3:
            break
    assert len(stack.fleet.live) == 3
    call.cancel()
    assert await settled(stack)

    # The same over HTTP: a client that stops reading a stream aborts all n.
    stream = await client.completions.create(model="tiny-llama", prompt="go on " * 20, max_tokens=1000, n=3,
                                             stream=True, **IGNORE_EOS)
    async for _ in stream:
        break
    await stream.close()
    assert await settled(stack)


async def test_bad_n_is_refused_naming_the_field(stack, client) -> None:
    for n in (0, 17):
        req = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=2, n=n))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [r async for r in stack.api.Generate(req, timeout=60)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.n" in err.value.details()
    # The scheduler runs one sequence per request: n > 1 goes to the front door.
    direct = sched_pb.GenerateRequest(request_id="direct-n", prompt_token_ids=[5, 6, 7],
                                      sampling=pb.SamplingParams(max_tokens=2, n=2))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [e async for e in stack.stub.Generate(direct, timeout=60)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.n" in err.value.details()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2, n=2, best_of=3)
    assert refused.value.body["param"] == "best_of"
    same = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2, n=2, best_of=2)
    assert len(same.choices) == 2
