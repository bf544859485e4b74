"""The front door over real gRPC, in front of a real scheduler and two real workers."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb

from tests.reference import assert_greedy_matches, hf_greedy

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPTS = ["The quick brown fox", "def main():\n    return", "Grüße aus Köln — 東京 🚀", "a"]


def request(prompt: str | None = None, *, ids: list[int] | None = None, **sampling) -> pb.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    msg = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if ids is not None:
        msg.prompt_token_ids.ids.extend(ids)
    elif prompt is not None:
        msg.prompt = prompt
    return msg


async def run(api, req: pb.GenerateRequest):
    responses = [r async for r in api.Generate(req, timeout=60)]
    text = "".join(r.text for r in responses)
    ids = [t for r in responses for t in r.token_ids]
    return text, ids, responses[-1]


async def blocks_in_use(stack) -> int:
    stats = await stack.stub.GetStats(sched_pb.GetStatsRequest())
    return sum(w.num_blocks_used for w in stats.workers)


async def settle(stack) -> None:
    for _ in range(100):
        if not stack.fleet.live and await blocks_in_use(stack) == 0:
            return
        await asyncio.sleep(0.05)


async def test_greedy_text_matches_hf(stack, tiny_model_dir) -> None:
    tokenizer = stack.frontend.codec.tokenizer
    for prompt in PROMPTS:
        text, ids, last = await run(stack.api, request(prompt, max_tokens=20, ignore_eos=True))
        prompt_ids = tokenizer.encode(prompt)
        assert_greedy_matches(hf_greedy(tiny_model_dir, prompt_ids, 20), ids, prompt)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt_ids), 20)


async def test_text_deltas_equal_decode_for_sampled_multibyte_output(stack) -> None:
    tokenizer = stack.frontend.codec.tokenizer
    for seed in range(4):
        text, ids, _ = await run(stack.api, request("東京 🚀 café", max_tokens=48, temperature=1.5, seed=seed,
                                                    ignore_eos=True))
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


async def test_stop_string_ends_request_everywhere(stack) -> None:
    full, ids, _ = await run(stack.api, request(PROMPTS[0], max_tokens=40, ignore_eos=True))
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    assert stop and full.index(stop) >= 0
    text, _, last = await run(stack.api, request(PROMPTS[0], max_tokens=40, ignore_eos=True, stop=[stop]))
    assert text == full[: full.index(stop)]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.usage.completion_tokens < 40
    await settle(stack)
    assert not stack.fleet.live and await blocks_in_use(stack) == 0


async def test_chat_tokenize_and_model_info(stack) -> None:
    msg = pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0.0, max_tokens=8))
    msg.messages.messages.add(role="user", content="hello there")
    text, ids, last = await run(stack.api, msg)
    assert len(ids) >= 1 and last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    tok = pb.TokenizeRequest(add_special_tokens=True)
    tok.messages.messages.add(role="user", content="hello there")
    rendered = await stack.api.Tokenize(tok)
    expected = stack.frontend.codec.tokenizer.encode("<|user|>\nhello there<|end|>\n<|assistant|>\n")
    assert list(rendered.token_ids) == expected and rendered.num_tokens == len(expected)
    info = await stack.api.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model, info.max_model_len, info.vocab_size) == ("tiny-llama", 2048, 4096)


BAD_INPUTS = {
    "prompt": request(""),
    "sampling.temperature": request("hi", temperature=-0.5),
    "sampling.top_p": request("hi", top_p=1.5),
    "sampling.top_k": request("hi", top_k=-1),
    "sampling.max_tokens": request("hi", max_tokens=0),
    "prompt_token_ids": request(ids=[5, 99999]),
    "request": request("x" * 70_000),
    "messages[0].role": None,
}


@pytest.mark.parametrize("field", list(BAD_INPUTS))
async def test_bad_input_is_invalid_argument_naming_the_field(stack, field) -> None:
    req = BAD_INPUTS[field]
    if req is None:
        req = pb.GenerateRequest()
        req.messages.messages.add(role="wizard", content="hi")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(stack.api, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


async def test_prompt_plus_max_tokens_over_model_length(stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(stack.api, request("hello", max_tokens=2047))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens" in err.value.details() and "2048" in err.value.details()


async def test_client_cancel_frees_every_block(stack) -> None:
    call = stack.api.Generate(request("cancel me " * 20, max_tokens=1000, ignore_eos=True))
    async for response in call:
        if response.token_ids:
            break
    assert stack.fleet.live
    call.cancel()
    await settle(stack)
    assert not stack.fleet.live and await blocks_in_use(stack) == 0


async def test_concurrent_streams_complete(stack) -> None:
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abc xyz") for _ in range(rng.randint(1, 80))) for _ in range(32)]
    results = await asyncio.gather(*(run(stack.api, request(p or "a", max_tokens=10, ignore_eos=True)) for p in prompts))
    assert all(len(ids) == 10 for _, ids, _ in results)


async def test_a_duplicate_request_id_is_refused_and_the_running_one_is_untouched(stack) -> None:
    """Every request of this front door shares one scheduler stream, where the id is the only key:
    a second request under a live id must be refused, never steal or abort the first one's events."""
    first = request(PROMPTS[0], max_tokens=24, ignore_eos=True)
    first.request_id = "same-id"
    reference, ref_ids, _ = await run(stack.api, request(PROMPTS[0], max_tokens=24, ignore_eos=True))
    call = stack.api.Generate(first, timeout=60)
    responses = [await call.read()]  # the first is running now
    again = request(PROMPTS[1], max_tokens=4)
    again.request_id = "same-id"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await run(stack.api, again)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.value.details()
    while (r := await call.read()) is not grpc.aio.EOF:
        responses.append(r)
    assert [t for r in responses for t in r.token_ids] == ref_ids
    assert "".join(r.text for r in responses) == reference
    await settle(stack)
    assert not stack.fleet.live and await blocks_in_use(stack) == 0


async def test_cancels_in_any_order_leave_nothing_behind(stack) -> None:
    """Cancel before the submission is sent, just after, and mid-decode: every block comes back."""
    for delay_s in (0.0, 0.001, 0.05, 0.2):
        calls = [stack.api.Generate(request(p, max_tokens=64, ignore_eos=True), timeout=60) for p in PROMPTS]
        await asyncio.sleep(delay_s)
        for call in calls:
            call.cancel()
        await settle(stack)
        assert not stack.fleet.live and await blocks_in_use(stack) == 0, f"left behind after {delay_s} s"
        assert not stack.frontend.scheduler._connection._inboxes  # noqa: SLF001 - nothing waits on
