"""Tools, earlier calls and tool results in the prompt: the chat-template side of tool calling.

A template that mentions tools gets them in Hugging Face's shape (`template_messages`,
`template_tools`); for one that does not, like SmolLM2's, `render_turns` writes everything as plain
(role, text) turns in the markers the model learnt function calling with (`<tools>`, `<tool_call>`,
`<tool_response>`), which is also the format `tool_calls.AutoScanner` reads back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.tokenizer.api_types import ChatMessage, FunctionTool
from services.tokenizer.tool_calls import CALL_CLOSE, CALL_OPEN


def tools_prompt(tools: Sequence[FunctionTool]) -> str:
    """The system text that offers the tools, in the markers SmolLM2 learnt function calling with."""
    listing = json.dumps([{"name": t.name, "description": t.description, "parameters": json.loads(t.parameters)}
                          for t in tools], ensure_ascii=False)
    return ("You may call functions to answer. The functions you can call are described, as JSON, between "
            f"<tools> and </tools>:\n<tools>{listing}</tools>\n"
            "To call functions, reply with only a JSON list of calls between <tool_call> and </tool_call>, each "
            'call an object with the function\'s "name" and its "arguments" object, for example:\n'
            '<tool_call>[{"name": "some_function", "arguments": {"some_argument": "a value"}}]</tool_call>\n'
            "If no function fits, answer in plain text.")


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: shown to the model as the string it was


def render_turns(messages: Sequence[ChatMessage], tools: Sequence[FunctionTool]) -> list[tuple[str, str]]:
    """(role, text) turns for a template that knows nothing of tools. The tools go into the system
    turn (before the client's own system text, if any). An assistant's calls are written the way the
    model is asked to write them, so it sees its own format; a tool result becomes a user turn in
    <tool_response> markers, because SmolLM2 was taught to read results there and its template
    would otherwise open a "tool" turn, a role it never saw."""
    turns: list[tuple[str, str]] = []
    for m in messages:
        if m.role == "tool":
            turns.append(("user", f"<tool_response>\n{m.content}\n</tool_response>"))
        elif m.tool_calls:
            calls = json.dumps([{"name": c.name, "arguments": _arguments_value(c.arguments)} for c in m.tool_calls],
                               ensure_ascii=False)
            text = f"{CALL_OPEN}{calls}{CALL_CLOSE}"
            turns.append((m.role, f"{m.content}\n{text}" if m.content else text))
        else:
            turns.append((m.role, m.content))
    if tools:
        if turns and turns[0][0] == "system":
            turns[0] = ("system", f"{tools_prompt(tools)}\n\n{turns[0][1]}")
        else:
            turns.insert(0, ("system", tools_prompt(tools)))
    return turns


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself, in Hugging Face's shape (arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": _arguments_value(c.arguments)}}
                                  for c in m.tool_calls]
        if m.tool_call_id:
            turn["tool_call_id"] = m.tool_call_id
        out.append(turn)
    return out


def template_tools(tools: Sequence[FunctionTool]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": json.loads(t.parameters)}} for t in tools]
