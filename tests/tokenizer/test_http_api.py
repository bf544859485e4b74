"""The OpenAI-compatible HTTP API, driven by the official `openai` client over real HTTP on loopback.

Most tests run against the real in-process stack (front door, scheduler, two workers over gRPC);
the error-mapping tests put a scripted frontend behind the same app, since a full queue or a
failure half-way through a stream cannot be provoked on demand from a real one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb

from services.tokenizer.frontend import GenerateChunk, GenerateInput, TokenLogprob, Usage
from services.tokenizer.http_api import create_app, serve_http, set_ready
from shared.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
async def http(stack):
    app = create_app(stack.frontend)
    server = await serve_http(app, "127.0.0.1", 0)
    yield app, server
    await server.stop()


@pytest.fixture(scope="module")
async def client(http) -> AsyncIterator[openai.AsyncOpenAI]:
    _, server = http
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                                  max_retries=0, timeout=60) as c:
        yield c


async def blocks_in_use(stack) -> int:
    stats = await stack.stub.GetStats(sched_pb.GetStatsRequest())
    return sum(w.num_blocks_used for w in stats.workers)


async def settle(stack, within_s: float = 10.0) -> bool:
    """Whether every request has left the scheduler and freed its blocks within the time."""
    for _ in range(int(within_s / 0.05)):
        if not stack.fleet.live and await blocks_in_use(stack) == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_models_and_health(stack, http, client) -> None:
    app, server = http
    assert server.port > 0
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert models.data[0].model_extra["max_model_len"] == 2048
    assert (await client.models.retrieve("tiny-llama")).id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-5")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as h:
        ok = await h.get("/health")
        assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
        set_ready(app, False)
        try:
            assert (await h.get("/health")).status_code == 503
            with pytest.raises(openai.InternalServerError) as err:
                await client.completions.create(model="tiny-llama", prompt="hi", max_tokens=1)
            assert err.value.status_code == 503
        finally:
            set_ready(app, True)
        assert (await h.get("/health")).status_code == 200
        missing = await h.get("/v1/nowhere")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


async def test_completion_streaming_equals_non_streaming(stack, client) -> None:
    whole = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, **GREEDY)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.model == "tiny-llama"
    assert whole.created > 0
    [only] = whole.choices
    assert only.index == 0 and only.finish_reason == "length" and only.text and only.logprobs is None
    prompt_ids = stack.frontend.tokenize(PROMPT)
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == len(prompt_ids) + 24
    assert whole.usage.prompt_tokens_details.cached_tokens >= 0

    stream = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, stream=True, **GREEDY)
    chunks = [c async for c in stream]
    assert len(chunks) > 1 and len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in chunks) == only.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and all(c.usage is None for c in chunks)

    # Token ids as the prompt give the same text as the string they encode.
    by_ids = await client.completions.create(model="tiny-llama", prompt=prompt_ids, max_tokens=24, **GREEDY)
    assert by_ids.choices[0].text == only.text
    one = await client.completions.create(model="tiny-llama", prompt=[PROMPT], max_tokens=24, **GREEDY)
    assert one.choices[0].text == only.text


async def test_chat_streaming_equals_non_streaming(client) -> None:
    whole = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_completion_tokens=20, **GREEDY)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    [only] = whole.choices
    assert only.message.role == "assistant" and only.message.content and only.finish_reason == "length"
    assert whole.usage.completion_tokens == 20

    stream = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=20, stream=True,
                                                  **GREEDY)
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == only.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_include_usage_reports_cached_tokens(stack, client) -> None:
    prompt = "A long shared prefix that spans several KV blocks. " * 6
    num_prompt_tokens = len(stack.frontend.tokenize(prompt))
    for attempt in range(2):
        stream = await client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY)
        chunks = [c async for c in stream]
        *deltas, last = chunks
        assert all(c.usage is None and len(c.choices) == 1 for c in deltas)
        assert last.choices == [] and last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (num_prompt_tokens, 5)
        assert last.usage.total_tokens == num_prompt_tokens + 5
    # The second identical prompt hits the prefix cache for all its full blocks.
    assert last.usage.prompt_tokens_details.cached_tokens >= num_prompt_tokens - 16 > 0

    chat = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in chat]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


async def test_stop_string_is_honoured(stack, client) -> None:
    full = (await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=40, **GREEDY)).choices[0].text
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    expected = full[: full.index(stop)]
    whole = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=40, stop=[stop], **GREEDY)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 40
    stream = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=40, stop=stop,
                                             stream=True, **GREEDY)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert await settle(stack)


async def test_completion_logprobs(stack, client) -> None:
    whole = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, logprobs=3, **GREEDY)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        # Greedy: the chosen token is the most likely one.
        assert top[token] == pytest.approx(max(top.values()), abs=1e-4) == pytest.approx(logprob, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == whole.choices[0].text

    stream = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, logprobs=3,
                                             stream=True, **GREEDY)
    tokens = [t async for c in stream for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert tokens == lp.tokens


async def test_chat_logprobs(client) -> None:
    whole = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, logprobs=True,
                                                 top_logprobs=2, **GREEDY)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    stream = await client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, logprobs=True,
                                                  stream=True, **GREEDY)
    streamed = [e async for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed)  # logprobs without top_logprobs: no alternatives


BAD_COMPLETIONS = [
    ("temperature", {"temperature": -1}),
    ("top_p", {"top_p": 1.5}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": 4000}),  # prompt + max_tokens over the model length
    # 4,300 nines parse, but prompt + max_tokens has 4,301 digits, which Python refuses to print
    # (found by the fuzz suite: it was a 500); an int32 on the wire, so it is bounded first.
    ("max_tokens", {"max_tokens": int("9" * 4300)}),
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": []}),
    ("prompt", {"prompt": ["one", "two"]}),
    ("prompt", {"prompt": [5, 99999]}),
    ("model", {"model": "gpt-4"}),
    ("n", {"n": 17}),
    ("n", {"n": 0}),
    ("best_of", {"best_of": 2}),
    ("best_of", {"n": 2, "best_of": 3}),
    ("logprobs", {"logprobs": 50}),
    ("stop", {"stop": [""]}),
    ("temperature", {"extra_body": {"temperature": "hot"}}),
    ("stream_options", {"stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize("param,kw", BAD_COMPLETIONS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_COMPLETIONS)])
async def test_bad_completion_is_400_naming_the_param(client, param, kw) -> None:
    args = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(**args)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert param in err.value.body["message"] or "model" in err.value.body["message"]
    if param == "model":
        assert err.value.body["message"].endswith("The model `gpt-4` does not exist.")
    if "stream_options" not in kw:  # the same refusal, before any byte of a stream
        with pytest.raises(openai.BadRequestError) as streamed:
            await client.completions.create(**args, stream=True)
        assert streamed.value.body["param"] == param


BAD_CHATS = [
    ("messages[0].role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("messages", {"messages": []}),
    ("messages[0].content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("top_logprobs", {"top_logprobs": 2}),
    ("max_completion_tokens", {"max_completion_tokens": 0}),
    ("temperature", {"temperature": -1}),
    ("n", {"n": 17}),
]


@pytest.mark.parametrize("param,kw", BAD_CHATS, ids=[p for p, _ in BAD_CHATS])
async def test_bad_chat_is_400_naming_the_param(client, param, kw) -> None:
    args = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(**args)
    assert err.value.body["param"] == param and param in err.value.body["message"]


async def test_malformed_and_oversize_bodies(stack, http, client) -> None:
    _, server = http
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}/v1") as h:
        bad = await h.post("/completions", content=b'{"prompt": "hi", "max_tokens": ', 
                           headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        not_object = await h.post("/chat/completions", json=["hello"])
        assert not_object.status_code == 400 and not_object.json()["error"]["type"] == "invalid_request_error"
        missing = await h.post("/chat/completions", json={"model": "tiny-llama"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    with pytest.raises(openai.APIStatusError) as err:
        await client.completions.create(model="tiny-llama", prompt="x" * (2 << 20), max_tokens=1)
    assert err.value.status_code == 413 and "1048576 bytes" in err.value.body["message"]
    assert await settle(stack)


async def test_client_disconnect_stops_generation(stack, http, client) -> None:
    stream = await client.completions.create(model="tiny-llama", prompt="cancel me " * 20, max_tokens=1000,
                                             stream=True, **GREEDY)
    async for chunk in stream:
        if chunk.choices[0].text:
            break
    assert stack.fleet.live
    await stream.close()
    # Well under the seconds the 1000 tokens would take: the close aborted the request.
    assert await settle(stack, within_s=2), "abandoned stream kept running"

    # Non-streaming: a client that times out and hangs up aborts the request too.
    _, server = http
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}/v1") as h:
        body = {"model": "tiny-llama", "prompt": "wait for me " * 20, "max_tokens": 1500, "ignore_eos": True}
        request = asyncio.create_task(h.post("/completions", json=body))
        while not stack.fleet.live:
            await asyncio.sleep(0.01)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert await settle(stack, within_s=2), "abandoned request kept running"


async def test_concurrent_http_streams(client) -> None:
    async def one(i: int) -> str:
        stream = await client.completions.create(model="tiny-llama", prompt=f"request {i}", max_tokens=12,
                                                 stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in stream])

    texts = await asyncio.gather(*(one(i) for i in range(16)))
    alone = [(await client.completions.create(model="tiny-llama", prompt=f"request {i}", max_tokens=12,
                                              **GREEDY)).choices[0].text for i in (0, 7)]
    assert [texts[0], texts[7]] == alone


class ScriptedFrontend:
    """Stands in for `Frontend`: raises `fail` before or after `num_chunks` chunks."""

    model_name = "scripted"
    max_model_len = 128
    vocab_size = 100
    response_cache = None

    def __init__(self, fail: Exception | None, num_chunks: int = 0) -> None:
        self.fail = fail
        self.num_chunks = num_chunks
        self.closed = asyncio.Event()
        self.inputs: list[GenerateInput] = []

    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"

    async def generate(self, inp: GenerateInput, **_) -> AsyncIterator[GenerateChunk]:
        self.inputs.append(inp)
        try:
            for i in range(self.num_chunks):
                yield GenerateChunk(inp.request_id, f"t{i} ", (i,), (TokenLogprob(-0.5, (i,), (-0.5,)),), None)
            if self.fail is not None:
                raise self.fail
            yield GenerateChunk(inp.request_id, "", (), (), "length", Usage(3, self.num_chunks, 0))
        finally:
            self.closed.set()


async def scripted(frontend: ScriptedFrontend):
    server = await serve_http(create_app(frontend, max_request_bytes=4096), "127.0.0.1", 0)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0)
    return server, client


@pytest.mark.parametrize("error,status,kind", [
    (ResourceExhausted("queue full", retry_after_s=2.5), 429, openai.RateLimitError),
    (Unavailable("no worker of pool canary is up"), 503, openai.InternalServerError),
    (DeadlineExceeded("deadline passed"), 504, openai.InternalServerError),
    (RuntimeError("secret internals"), 500, openai.InternalServerError),
])
async def test_typed_errors_map_to_status(error, status, kind) -> None:
    frontend = ScriptedFrontend(error)
    server, client = await scripted(frontend)
    try:
        for stream in (False, True):
            with pytest.raises(kind) as err:
                await client.completions.create(model="scripted", prompt="hi", stream=stream)
            assert err.value.status_code == status
            message = err.value.body["message"]
            if status == 429:
                assert err.value.response.headers["retry-after"] == "3"
                assert err.value.response.headers["retry-after-ms"] == "2500"
            if status == 500:
                assert "secret" not in message and "Traceback" not in message and "error id" in message
            else:
                assert message == str(error)
    finally:
        await client.close()
        await server.stop()
        await server.stop()  # stopping twice is harmless


async def test_error_mid_stream_is_a_last_event() -> None:
    frontend = ScriptedFrontend(InvalidArgument("went wrong late", field="sampling.top_k"), num_chunks=2)
    server, client = await scripted(frontend)
    try:
        stream = await client.chat.completions.create(model="scripted", messages=CHAT, stream=True)
        seen = []
        with pytest.raises(openai.APIError) as err:
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content)
        assert seen == ["", "t0 ", "t1 "]
        assert err.value.body["param"] == "top_k" and "went wrong late" in err.value.body["message"]
        async with httpx.AsyncClient() as h:
            raw = await h.post(f"http://127.0.0.1:{server.port}/v1/completions",
                               json={"prompt": "hi", "stream": True})
        events = [e for e in raw.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and "error" in json.loads(events[-2].removeprefix("data: "))
    finally:
        await client.close()
        await server.stop()


async def test_extras_reach_the_frontend_and_small_limit_applies() -> None:
    frontend = ScriptedFrontend(None, num_chunks=1)
    server, client = await scripted(frontend)
    try:
        await client.chat.completions.create(
            model="scripted", messages=CHAT, max_tokens=7, max_completion_tokens=9, stop="x", seed=3,
            logprobs=True, top_logprobs=4, presence_penalty=0.5, frequency_penalty=0.25, top_p=0.9, user="u",
            extra_body={"session_id": "s1", "cache_salt": "tenant", "priority": 2, "top_k": 5, "min_p": 0.1,
                        "repetition_penalty": 1.1, "stop_token_ids": [2], "ignore_eos": True},
            extra_headers={"X-Request-Id": "abc"})
        [inp] = frontend.inputs
        assert inp.request_id == "chatcmpl-abc" and inp.messages[1].content == "Say something."
        assert (inp.session_id, inp.cache_salt, inp.priority) == ("s1", "tenant", 2)
        s = inp.sampling
        assert (s.max_tokens, s.stop, s.seed, s.logprobs, s.top_k, s.min_p, s.stop_token_ids, s.ignore_eos) == (
            9, ("x",), 3, 4, 5, 0.1, (2,), True)
        assert (s.presence_penalty, s.frequency_penalty, s.top_p, s.repetition_penalty) == (0.5, 0.25, 0.9, 1.1)
        default = await client.completions.create(model="scripted", prompt="hi")
        assert frontend.inputs[-1].sampling.max_tokens == 16 and default.choices[0].logprobs is None
        with pytest.raises(openai.APIStatusError) as err:
            await client.completions.create(model="scripted", prompt="y" * 5000)
        assert err.value.status_code == 413 and "4096 bytes" in err.value.body["message"]
    finally:
        await client.close()
        await server.stop()


class Endless(ScriptedFrontend):
    """Streams "x" until the consumer goes away, then says so."""

    async def generate(self, inp: GenerateInput, **_) -> AsyncIterator[GenerateChunk]:
        try:
            while True:
                yield GenerateChunk(inp.request_id, "x", (1,), (), None)
                await asyncio.sleep(0.01)
        finally:
            self.closed.set()


async def test_disconnect_closes_the_frontend_stream() -> None:
    frontend = Endless(None)
    server, client = await scripted(frontend)
    try:
        stream = await client.completions.create(model="scripted", prompt="hi", stream=True)
        async for _ in stream:
            break
        await stream.close()
        await asyncio.wait_for(frontend.closed.wait(), 5)
    finally:
        await client.close()
        await server.stop()


async def test_stop_ends_streams_after_the_grace_and_leaves_signals_alone() -> None:
    import signal  # noqa: PLC0415

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    frontend = Endless(None)
    server, client = await scripted(frontend)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    try:
        stream = await client.completions.create(model="scripted", prompt="hi", stream=True)
        async for _ in stream:
            break
        started = asyncio.get_running_loop().time()
        await server.stop(grace_s=0.3)
        assert asyncio.get_running_loop().time() - started < 3
        await asyncio.wait_for(frontend.closed.wait(), 2)
        with pytest.raises(openai.APIError) as err:
            async for _ in stream:  # the stream ends with an error event saying why
                pass
        assert "shutting down" in err.value.message
    finally:
        await stream.close()
        await client.close()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
