"""logit_bias through the whole in-process stack: the official `openai` client over HTTP and the
public gRPC API, down to the worker's sampler, and the refusals of bad ids and values."""

from __future__ import annotations


import grpc
import openai
import pytest
from switchyard.api.v1 import generation_pb2 as pb


pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Say something."}]


async def grpc_run(stack, bias: dict[int, float] | None = None, **sampling) -> tuple[list[int], str]:
    sampling = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, **sampling}
    req = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(logit_bias=bias or {}, **sampling))
    responses = [r async for r in stack.api.Generate(req, timeout=60)]
    return [t for r in responses for t in r.token_ids], "".join(r.text for r in responses)


async def grpc_ids(stack, bias: dict[int, float] | None = None, **sampling) -> list[int]:
    return (await grpc_run(stack, bias, **sampling))[0]


def forced_token(stack) -> int:
    return stack.frontend.tokenize("zebra", add_special_tokens=False)[-1]


async def test_grpc_plus_100_forces_and_minus_100_bans(stack) -> None:
    target = forced_token(stack)
    plain = await grpc_ids(stack)
    assert target not in plain
    assert await grpc_ids(stack, {target: 100.0}) == [target] * 6
    # Sampling too: at temperature 1 the forced token still wins every draw.
    assert await grpc_ids(stack, {target: 100.0}, temperature=1.0, seed=5) == [target] * 6
    banned = await grpc_ids(stack, {plain[0]: -100.0})
    assert banned[0] != plain[0] and plain[0] not in banned


async def test_http_completions_and_chat_take_the_openai_shape(stack, client) -> None:
    target = forced_token(stack)
    forced_ids, expected = await grpc_run(stack, {target: 100.0}, max_tokens=5)
    assert forced_ids == [target] * 5 and expected
    whole = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0.0,
                                            logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected
    stream = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0.0,
                                             logit_bias={str(target): 100}, stream=True,
                                             extra_body={"ignore_eos": True})
    assert "".join([c.choices[0].text async for c in stream]) == expected
    chat = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=5, temperature=0.0,
                                                logit_bias={str(target): 100.0}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content.strip() == expected.strip()

    first = (await grpc_ids(stack))[0]  # the greedy first token
    plain = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1, temperature=0.0)
    banned = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1, temperature=0.0,
                                             logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text


BAD_BIASES = [
    ({"4096": 1}, "[0, 4096)"),  # tiny-llama's vocabulary is 4096 ids
    ({"-1": 1}, "[0, 4096)"),
    ({"5": 100.5}, "[-100, 100]"),
    ({"5": -1000}, "[-100, 100]"),
    ({"five": 1}, "token ids"),
    ({" 5": 1}, "token ids"),
    ({"5": "x"}, ""),
]


@pytest.mark.parametrize("bias,quoted", BAD_BIASES, ids=[str(b) for b, _ in BAD_BIASES])
async def test_http_refuses_bad_biases_naming_logit_bias(client, bias, quoted) -> None:
    for create, args in ((client.completions.create, {"prompt": PROMPT}),
                         (client.chat.completions.create, {"messages": CHAT})):
        with pytest.raises(openai.BadRequestError) as err:
            await create(model="tiny-llama", max_tokens=2, logit_bias=bias, **args)
        assert err.value.body["param"] == "logit_bias" and "logit_bias" in err.value.body["message"]
        assert quoted in err.value.body["message"]


@pytest.mark.parametrize("bias,quoted", [({4096: 1.0}, "[0, 4096)"), ({-7: 1.0}, "[0, 4096)"),
                                         ({3: 101.0}, "[-100, 100]"), ({3: float("inf")}, "[-100, 100]")])
async def test_grpc_refuses_bad_biases_naming_the_field(stack, bias, quoted) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_ids(stack, bias)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.logit_bias" in err.value.details() and quoted in err.value.details()
