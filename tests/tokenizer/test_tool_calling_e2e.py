"""Tool calling through the whole in-process stack on the real model (SmolLM2-135M-Instruct), with
the official `openai` client: a forced call (named or required) whose arguments are valid against
the function's schema, the tool's result sent back for a text answer, streaming (deltas put back
together by the client's own accumulator) and not; "auto" and "none"; and the 400s of bad input."""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from services.tokenizer.api_types import ChatMessage, FunctionTool, ToolCall
from services.tokenizer.codec import Codec
from tests.inprocess import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": {"type": "object",
                                                     "properties": {"zone": {"type": "string", "maxLength": 40}},
                                                     "required": ["zone"]}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now, in celsius?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
GREEDY = {"temperature": 0, "max_tokens": 96}


@pytest.fixture(scope="module")
async def stack(smollm2_model_dir):
    async with Stack(smollm2_model_dir, front_door=True, num_workers=1) as running:
        yield running


async def ask(client: openai.AsyncOpenAI, stream: bool, **body):
    """The completion, and for a stream its chunks (the completion is the client's own reassembly)."""
    model = (await client.models.list()).data[0].id
    if not stream:
        return await client.chat.completions.create(model=model, **GREEDY, **body), []
    state, chunks = ChatCompletionStreamState(), []
    async for chunk in await client.chat.completions.create(model=model, stream=True, **GREEDY, **body):
        state.handle_chunk(chunk)
        chunks.append(chunk)
    return state.get_final_completion(), chunks


def check_call_deltas(chunks) -> None:
    """OpenAI's streamed shape: the first delta of a call has its id, type and name and arguments "",
    the later ones only argument fragments."""
    deltas = [d for c in chunks for choice in c.choices for d in choice.delta.tool_calls or ()]
    assert deltas, "no tool_calls deltas in the stream"
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.type == "function" and first.function.name
    assert first.function.arguments == ""
    assert all(d.id is None and d.function.name is None and d.index == first.index for d in rest)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("tool_choice", [NAMED, "required"], ids=["named", "required"])
async def test_forced_call_then_the_result_gives_an_answer(client, stream, tool_choice):
    first, chunks = await ask(client, stream, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and len(call.id) > len("call_") and call.type == "function"
    if tool_choice == NAMED:
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    if stream:
        check_call_deltas(chunks)

    history = [*QUESTION,
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": call.id, "type": "function",
                                "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "celsius"})}]
    second, chunks = await ask(client, stream, messages=history, tools=TOOLS, tool_choice="none")
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert isinstance(answer.message.content, str) and answer.message.content.strip()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_auto_answers_with_text_or_valid_calls(client, stream):
    completion, _ = await ask(client, stream, messages=QUESTION, tools=TOOLS)
    choice = completion.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.function.name in PARAMETERS
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


async def test_none_answers_in_text(client):
    completion, _ = await ask(client, False, messages=QUESTION, tools=TOOLS, tool_choice="none")
    assert completion.choices[0].message.tool_calls is None and completion.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], {"type": "retrieval"}]}, "tools[1].type"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}], "tool_choice": "required"},
     "tools[1].function.parameters"),
    ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [TOOLS[0]["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
], ids=["unknown-name", "unknown-choice", "choice-without-tools", "not-function", "no-name", "parameters",
        "uncompilable-parameters", "forced-and-response-format", "legacy-functions", "legacy-function-call"])
async def test_bad_input_is_a_400_naming_the_field(client, body, param):
    model = (await client.models.list()).data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, **body)
    assert e.value.body["param"] == param, e.value.body


async def test_bad_assistant_tool_calls_are_a_400(client):
    model = (await client.models.list()).data[0].id
    history = [*QUESTION, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                                "function": {"arguments": "{}"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=model, messages=history, max_tokens=4)
    assert e.value.body["param"] == "messages[1].tool_calls[0].function.name", e.value.body


async def test_a_template_that_knows_tools_renders_them_itself(smollm2_model_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_model_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
        "{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}{% endfor %}")
    codec = Codec(tmp_path)
    assert codec.template_takes_tools and not Codec(smollm2_model_dir).template_takes_tools
    text = codec.render_conversation(
        (ChatMessage("user", "hi"),
         ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
         ChatMessage("tool", "sunny", tool_call_id="call_1")), (FunctionTool("get_weather"),))
    assert text == "[tool get_weather]<user>hi<assistant>[call get_weather Oslo]<tool>sunny[for call_1]"
