"""Unit tests of the pure tool-calling module: reading tools, the forced call's schema, rendering,
and the scanners that turn output (whole or in any fragments) into OpenAI tool calls."""

from __future__ import annotations

import json
from itertools import count

import jsonschema
import pytest

from services.tokenizer.api_types import ChatMessage, ToolCall
from services.tokenizer.tool_calls import (
    CALL_OPEN, AutoScanner, CallDelta, CallScanner, ToolUse, message_parts, parse_tools, tool_use,
)
from services.tokenizer.tool_prompt import render_turns, template_messages, tools_prompt
from shared.errors import InvalidArgument

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = parse_tools([WEATHER, TIME])


def ids():
    numbers = count()
    return lambda: f"call_{next(numbers)}"


def run(scanner, pieces):
    events = []
    for piece in pieces:
        events += scanner.feed(piece)
    return events + scanner.finish()


def splits(text):
    """`text` whole, char by char, and cut in two at every position."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


# --- reading tools and tool_choice --------------------------------------------------------------

def test_parse_tools_keeps_names_descriptions_and_parameters():
    weather, clock = TOOLS
    assert (weather.name, weather.description) == ("get_weather", "The weather in a city")
    assert json.loads(weather.parameters) == WEATHER["function"]["parameters"]
    assert clock.description == "" and json.loads(clock.parameters) == {"type": "object", "properties": {}}
    assert json.loads(parse_tools([{"type": "function", "function": {"name": "f"}}])[0].parameters)["type"] == "object"


@pytest.mark.parametrize("tools, field", [
    ([{"type": "retrieval"}], "tools[0].type"),
    ([WEATHER, {"function": {"name": "x"}}], "tools[1].type"),
    (["get_weather"], "tools[0]"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "not an object"}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": ["a"]}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "description": "\ud800"}}], "tools[0].function"),
])
def test_bad_tools_name_the_field(tools, field):
    with pytest.raises(InvalidArgument) as e:
        parse_tools(tools)
    assert e.value.field == field


def test_tool_choice_modes():
    assert tool_use([WEATHER], None) == ToolUse(TOOLS[:1], "auto")
    assert tool_use([WEATHER], "auto").mode == "auto"
    assert tool_use([WEATHER], "none") is None
    assert tool_use(None, None) is None and tool_use([], None) is None
    assert tool_use([WEATHER, TIME], "required") == ToolUse(TOOLS, "required")
    named = tool_use([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert (named.mode, named.function, named.constrained) == ("function", "get_time", True)


@pytest.mark.parametrize("tools, choice", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}),
    ([WEATHER], {"type": "function"}),
    ([WEATHER], {"type": "tool", "function": {"name": "get_weather"}}),
    ([WEATHER], "sometimes"),
    (None, "auto"),
    (None, {"type": "function", "function": {"name": "get_weather"}}),
    ([], "required"),
])
def test_bad_tool_choice_names_tool_choice(tools, choice):
    with pytest.raises(InvalidArgument) as e:
        tool_use(tools, choice)
    assert e.value.field == "tool_choice"


# --- the forced call's schema -------------------------------------------------------------------

def test_named_call_schema_is_one_object_name_first():
    schema = tool_use([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}).call_schema()
    assert list(schema["properties"]) == ["name", "arguments"]
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Paris"}}, schema)
    for bad in ({"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"days": 2}},
                {"name": "get_weather", "arguments": {"city": "P"}, "extra": 1}, {"name": "get_weather"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_required_call_schema_takes_any_tool():
    schema = tool_use([WEATHER, TIME], "required").call_schema()
    assert len(schema["anyOf"]) == 2
    jsonschema.validate({"name": "get_time", "arguments": {}}, schema)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {}}, schema)
    assert tool_use([TIME], "required").call_schema()["properties"]["name"] == {"const": "get_time"}


# --- rendering ----------------------------------------------------------------------------------

CONVERSATION = (
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", "sunny, 21 C", tool_call_id="call_1"),
)


def test_render_turns_puts_tools_in_a_system_turn_and_calls_and_results_in_text():
    turns = render_turns(CONVERSATION, TOOLS)
    assert [role for role, _ in turns] == ["system", "user", "assistant", "user"]
    assert turns[0][1] == tools_prompt(TOOLS) and "<tools>" in turns[0][1] and '"get_weather"' in turns[0][1]
    assert turns[2][1] == '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'
    assert turns[3][1] == "<tool_response>\nsunny, 21 C\n</tool_response>"


def test_render_turns_merges_tools_into_the_clients_system_turn():
    turns = render_turns((ChatMessage("system", "Be brief."), *CONVERSATION[:1]), TOOLS)
    assert turns[0] == ("system", f"{tools_prompt(TOOLS)}\n\nBe brief.") and len(turns) == 2
    assert render_turns(CONVERSATION[:1], ()) == [("user", "Weather in Paris?")]  # tool_choice "none"


def test_render_turns_keeps_assistant_text_and_arguments_that_are_not_json():
    turn = render_turns((ChatMessage("assistant", "Let me look.", (ToolCall("c", "f", "{oops"),)),), ())[0]
    assert turn == ("assistant", 'Let me look.\n<tool_call>[{"name": "f", "arguments": "{oops"}]</tool_call>')


def test_template_messages_are_in_hugging_face_shape():
    messages = template_messages(CONVERSATION)
    assert messages[1]["tool_calls"] == [{"id": "call_1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}


# --- the forced call, scanned -------------------------------------------------------------------

FORCED = '{"name":"get_weather","arguments":{"city":"Pa}ri\\"s {[","days":3}}'
WHOLE_CALL = [{"id": "call_0", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city":"Pa}ri\\"s {[","days":3}'}}]


@pytest.mark.parametrize("pieces", list(splits(FORCED)), ids=str)
def test_call_scanner_gives_the_same_call_at_every_split(pieces):
    events = run(CallScanner(TOOLS, ids()), pieces)
    assert message_parts(events) == (None, WHOLE_CALL)
    assert events[0] == CallDelta(0, "", "call_0", "get_weather")  # the header comes first, alone
    assert all(isinstance(e, CallDelta) and e.id is None and e.arguments for e in events[1:])


def test_call_scanner_streams_arguments_as_they_grow():
    scanner = CallScanner(TOOLS, ids())
    assert scanner.feed('{"name":"get_wea') == []  # the name is not whole yet
    assert scanner.feed('ther","arguments":{"ci') == [CallDelta(0, "", "call_0", "get_weather"), CallDelta(0, '{"ci')]
    assert scanner.feed('ty":"Oslo"}') == [CallDelta(0, 'ty":"Oslo"}')]
    assert scanner.feed("}") == [] and scanner.finish() == [] and scanner.num_calls == 1


@pytest.mark.parametrize("text, arguments", [
    ('{ "name" : "get_time" , "arguments" : { } }', "{ }"),
    ('{"name":"get_time","arguments":{}}', "{}"),
    ('{"name":"get_time","arguments":[1,{"a":"]"}]}', '[1,{"a":"]"}]'),
    ('{"name":"get_time","arguments":"a,}b"}', '"a,}b"'),
    ('{"name":"get_time","arguments":42}', "42"),
    ('{"name":"get_time","arguments":{"a":', '{"a":'),  # cut short (finish "length"): as far as it came
])
def test_call_scanner_arguments_values(text, arguments):
    for pieces in splits(text):
        content, calls = message_parts(run(CallScanner(TOOLS, ids()), pieces))
        assert content is None and calls[0]["function"] == {"name": "get_time", "arguments": arguments}


@pytest.mark.parametrize("text", ["Sorry, I cannot.", '{"answer": 1}', "", "  ", '{"name": 3}'])
def test_call_scanner_leaves_what_is_not_a_call_as_content(text):
    for pieces in splits(text):
        scanner = CallScanner(TOOLS, ids())
        assert message_parts(run(scanner, pieces)) == (text, []) and scanner.num_calls == 0


def test_call_scanner_reads_the_free_format_when_the_output_was_not_held_to_the_schema():
    text = '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>'
    for pieces in splits(text):
        assert message_parts(run(CallScanner(TOOLS, ids()), pieces))[1][0]["function"]["name"] == "get_time"


# --- free output, scanned -----------------------------------------------------------------------

AUTO = ('Let me check. \n<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": "{}"}]</tool_call>\n')


@pytest.mark.parametrize("pieces", list(splits(AUTO)), ids=str)
def test_auto_scanner_gives_the_same_calls_at_every_split(pieces):
    scanner = AutoScanner(TOOLS, ids())
    content, calls = message_parts(run(scanner, pieces))
    assert content == "Let me check." and scanner.num_calls == 2
    assert calls == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]


@pytest.mark.parametrize("text", [
    "Plain answer, with a < sign and <tool and </tool_call> in it.\n",
    "<tool_call>not json</tool_call> after",
    '<tool_call>[{"name": "unknown_tool", "arguments": {}}]</tool_call>',
    '<tool_call>[{"name": "get_time", "arguments": 5}]</tool_call>',
    "<tool_call>[{\"name\": \"get_time\", \"arguments\": {}",  # cut short: not whole JSON
    "ends with <tool_ca",
    "  spaced  ",
])
def test_auto_scanner_leaves_what_is_not_a_call_as_content(text):
    for pieces in splits(text):
        scanner = AutoScanner(TOOLS, ids())
        assert message_parts(run(scanner, pieces)) == (text, []) and scanner.num_calls == 0


def test_auto_scanner_streams_content_and_holds_only_a_possible_call():
    scanner = AutoScanner(TOOLS, ids())
    assert scanner.feed("Hello") == ["Hello"]
    assert scanner.feed(" world <tool") == [" world"]  # the space waits for what follows
    assert scanner.feed("box> ok") == [" <toolbox> ok"]
    assert scanner.feed(CALL_OPEN + '{"name": "get_time"') == []
    assert scanner.feed(', "arguments": {}}</tool_call> ') == [
        CallDelta(0, "", "call_0", "get_time"), CallDelta(0, "{}")]
    assert scanner.finish() == []  # the space after a call is dropped


def test_auto_scanner_takes_an_unclosed_block_whose_json_is_whole():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
    for pieces in splits(text):
        content, calls = message_parts(run(AutoScanner(TOOLS, ids()), pieces))
        assert content is None and calls[0]["function"]["arguments"] == '{"city":"Rome"}'


def test_call_deltas_in_openai_shape():
    assert CallDelta(1, "", "call_x", "f").to_json() == {
        "index": 1, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert CallDelta(1, '{"a"').to_json() == {"index": 1, "function": {"arguments": '{"a"'}}
