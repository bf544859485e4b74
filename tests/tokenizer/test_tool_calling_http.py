"""The HTTP side of tool calling, on a scripted front door whose output is fixed text cut into
pieces: what `GenerateInput` carries (tools, the forced call's schema, the conversation), and the
OpenAI shapes of calls, whole and streamed, as the official `openai` client reads and reassembles
them. The model's own part is in test_tool_calling_e2e.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from services.tokenizer.api_types import GenerateChunk, GenerateInput, ToolCall, Usage
from services.tokenizer.http_api import create_app, serve_http

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}},
         {"type": "function", "function": {"name": "get_time"}}]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class ScriptedFrontend:
    """Answers every request with `text`, in pieces of `piece_chars`, and keeps the inputs."""

    model_name, max_model_len, response_cache = "scripted", 2048, None

    def __init__(self) -> None:
        self.text, self.piece_chars = "", 3
        self.inputs: list[GenerateInput] = []

    def token_text(self, token_id: int) -> str:
        return str(token_id)

    async def generate(self, inp: GenerateInput, **_: object) -> AsyncIterator[GenerateChunk]:
        """Each of the n sequences the same text, their chunks interleaved."""
        self.inputs.append(inp)
        pieces = [self.text[i:i + self.piece_chars] for i in range(0, len(self.text), self.piece_chars)] or [""]
        n = inp.sampling.n or 1
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            for index in range(n):
                yield GenerateChunk(inp.request_id, piece, (i,), (), "stop" if last else None,
                                    Usage(5, n * len(pieces), 0) if last and index == n - 1 else None, index=index)


@pytest.fixture(scope="module")
def frontend() -> ScriptedFrontend:
    return ScriptedFrontend()


@pytest.fixture(scope="module")
async def client(frontend) -> AsyncIterator[openai.AsyncOpenAI]:
    server = await serve_http(create_app(frontend), "127.0.0.1", 0)  # type: ignore[arg-type]
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0) as c:
        yield c
    await server.stop()


async def ask(client, stream: bool, **body):
    if not stream:
        return await client.chat.completions.create(model="scripted", **body), []
    state, chunks = ChatCompletionStreamState(), []
    async for chunk in await client.chat.completions.create(model="scripted", stream=True, **body):
        state.handle_chunk(chunk)
        chunks.append(chunk)
    return state.get_final_completion(), chunks


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("piece_chars", [1, 4, 1000])
async def test_forced_call_in_openai_shape(client, frontend, stream, piece_chars):
    frontend.text, frontend.piece_chars = '{"name":"get_weather","arguments":{"city":"Pa\\"ris"}}', piece_chars
    completion, chunks = await ask(client, stream, messages=QUESTION, tools=TOOLS, tool_choice=NAMED)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"Pa\\"ris"}')
    if stream:
        deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or ()]
        assert (deltas[0].id, deltas[0].function.name, deltas[0].function.arguments) == (call.id, "get_weather", "")
        assert all(d.id is None and d.function.name is None and d.function.arguments for d in deltas[1:])
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and chunks[0].choices[0].delta.role == "assistant"
    inp = frontend.inputs[-1]
    assert [t.name for t in inp.tools] == ["get_weather", "get_time"]
    assert inp.response_format is not None and inp.response_format.type == "json_schema"
    schema = json.loads(inp.response_format.json_schema)
    assert schema["properties"] == {"name": {"const": "get_weather"}, "arguments": PARAMETERS}


async def test_required_constrains_to_any_tool(client, frontend):
    frontend.text = '{"name":"get_time","arguments":{}}'
    completion, _ = await ask(client, False, messages=QUESTION, tools=TOOLS, tool_choice="required")
    assert completion.choices[0].message.tool_calls[0].function.name == "get_time"
    assert len(json.loads(frontend.inputs[-1].response_format.json_schema)["anyOf"]) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_auto_reads_calls_out_of_free_text(client, frontend, stream):
    frontend.text, frontend.piece_chars = ('Let me see.\n<tool_call>[{"name": "get_weather", "arguments": '
                                           '{"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]</tool_call>'), 5
    completion, chunks = await ask(client, stream, messages=QUESTION, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me see."
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", '{"city":"Oslo"}'), ("get_time", "{}")]
    assert len({c.id for c in choice.message.tool_calls}) == 2
    assert frontend.inputs[-1].response_format is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_auto_passes_plain_text_and_none_parses_nothing(client, frontend, stream):
    frontend.text = "It is sunny <tool in Oslo."
    completion, _ = await ask(client, stream, messages=QUESTION, tools=TOOLS)
    assert completion.choices[0].message.content == frontend.text and completion.choices[0].finish_reason == "stop"
    frontend.text = '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>'
    completion, _ = await ask(client, stream, messages=QUESTION, tools=TOOLS, tool_choice="none")
    assert completion.choices[0].message.content == frontend.text and not completion.choices[0].message.tool_calls
    assert frontend.inputs[-1].tools == () and frontend.inputs[-1].response_format is None


async def test_the_conversation_carries_calls_and_results(client, frontend):
    frontend.text = "Sunny."
    history = [*QUESTION,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"P"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    completion, _ = await ask(client, False, messages=history, tools=TOOLS)
    assert completion.choices[0].message.content == "Sunny."
    messages = frontend.inputs[-1].messages
    assert messages[1].tool_calls == (ToolCall("call_1", "get_weather", '{"city":"P"}'),) and messages[1].content == ""
    assert (messages[2].role, messages[2].content, messages[2].tool_call_id) == ("tool", "21 C", "call_1")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_each_of_n_choices_has_its_own_call(client, frontend, stream):
    frontend.text, frontend.piece_chars = '{"name":"get_time","arguments":{}}', 4
    completion, _ = await ask(client, stream, messages=QUESTION, tools=TOOLS, tool_choice="required", n=2)
    calls = [c.message.tool_calls for c in sorted(completion.choices, key=lambda c: c.index)]
    assert [len(c) for c in calls] == [1, 1] and {c[0].function.arguments for c in calls} == {"{}"}
    assert calls[0][0].id != calls[1][0].id
    assert [c.finish_reason for c in completion.choices] == ["tool_calls", "tool_calls"]
