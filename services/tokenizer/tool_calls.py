"""Tool calling on chat completions, the pure part: reading `tools`/`tool_choice`, the schema that
constrains a forced call, and turning the model's output (whole or streamed) into OpenAI
`tool_calls`. How tools and earlier calls enter the prompt is `tool_prompt.py`'s.

Two ways a call comes out of the model:

- `tool_choice` "required" or a named function: the output is constrained (`response_format`, a
  JSON schema) to exactly one call object `{"name": ..., "arguments": {...}}`, name first.
  `CallScanner` streams it: the call's header once the name is complete, then `arguments` as it
  grows, found by a string-aware bracket count. One call per response in this mode.
- `tool_choice` "auto": the model writes freely, in the format its system prompt asks for
  (SmolLM2's: a JSON list of calls between `<tool_call>` and `</tool_call>`). `AutoScanner` holds
  back text that could open a call until it is decided; a block whose JSON parses and names known
  tools becomes calls, anything else stays content.

Both scanners turn text into events: content strings and `CallDelta`s, the pieces of OpenAI's
streamed `delta.tool_calls[i]` (first the id, type and name with arguments "", then fragments).
The non-streaming response is the same events joined (`message_parts`), so both agree.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.tokenizer.api_types import FunctionTool
from shared.errors import InvalidArgument

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_ID_CHARS = string.ascii_letters + string.digits
_WS = " \t\r\n"


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass(frozen=True)
class CallDelta:
    """One piece of a streamed call: the header (id and name set, arguments "") or a fragment."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Event = str | CallDelta  # content text, or a piece of a call


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools: which ones, and "auto", "required" or "function" (by name)."""

    tools: tuple[FunctionTool, ...]
    mode: str
    function: str = ""

    @property
    def constrained(self) -> bool:
        return self.mode != "auto"

    def scanner(self, new_id: Callable[[], str] = new_call_id) -> CallScanner | AutoScanner:
        return CallScanner(self.tools, new_id) if self.constrained else AutoScanner(self.tools, new_id)

    def forced_tools(self) -> list[tuple[int, FunctionTool]]:
        """(index in tools, tool) of those a constrained response may call."""
        return [(i, t) for i, t in enumerate(self.tools) if self.mode == "required" or t.name == self.function]

    def call_schema(self) -> dict[str, Any]:
        """The JSON schema of the one call a constrained response is: name first, then arguments."""
        calls = [call_object(t) for _, t in self.forced_tools()]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}


def call_object(tool: FunctionTool) -> dict[str, Any]:
    """The schema of one call of `tool`."""
    return {"type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_tools(raw: list[Any]) -> tuple[FunctionTool, ...]:
    """OpenAI's `tools` list, checked; `strict` is accepted (a forced call is held to its schema anyway)."""
    tools: list[FunctionTool] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidArgument("must be an object", field=where)
        if tool.get("type") != "function":
            raise InvalidArgument(f'only "function" tools are supported, got {tool.get("type")!r}',
                                  field=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidArgument("must be an object with the function's name", field=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgument(f"must be 1 to 64 letters, digits, underscores or dashes, got {name!r}",
                                  field=f"{where}.function.name")
        if any(t.name == name for t in tools):
            raise InvalidArgument(f"{name!r} is defined twice", field=f"{where}.function.name")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise InvalidArgument("must be a string", field=f"{where}.function.description")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidArgument("must be a JSON schema object", field=f"{where}.function.parameters")
        try:  # rendered into the prompt as UTF-8; JSON can carry lone surrogates that cannot be
            json.dumps(fn, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("must be valid Unicode text (it holds a lone surrogate)",
                                  field=f"{where}.function") from None
        tools.append(FunctionTool(name, description, json.dumps(parameters, separators=(",", ":"))))
    return tuple(tools)


def tool_use(tools: list[Any] | None, tool_choice: str | dict[str, Any] | None) -> ToolUse | None:
    """The request's `tools` and `tool_choice`, or None when no tool is in play (none given, or "none")."""
    if not tools:  # an empty list is taken as none, as vLLM does
        if tool_choice is not None:
            raise InvalidArgument("is only allowed when tools are given", field="tool_choice")
        return None
    parsed = parse_tools(tools)
    if tool_choice is None or tool_choice == "auto":
        return ToolUse(parsed, "auto")
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolUse(parsed, "required")
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not any(t.name == name for t in parsed):
            raise InvalidArgument(f"names function {name!r}, which is not in tools", field="tool_choice")
        return ToolUse(parsed, "function", name)  # type: ignore[arg-type]
    raise InvalidArgument('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}, '
                          f"got {str(tool_choice)[:64]!r}", field="tool_choice")


# --- reading the output --------------------------------------------------------------------------

def message_parts(events: Sequence[Event]) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole message from its events: (content, tool_calls); content is None if only calls came."""
    content = "".join(e for e in events if isinstance(e, str))
    calls: dict[int, dict[str, Any]] = {}
    for e in events:
        if isinstance(e, CallDelta):
            if e.id is not None:
                calls[e.index] = {"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}}
            calls[e.index]["function"]["arguments"] += e.arguments
    return (content or None) if calls else content, list(calls.values())


def _string_end(text: str, start: int) -> int | None:
    """The index just past the JSON string opening at `start`, or None if it is not closed yet."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None


_STRING = object()
_HEADER = ("{", '"name"', ":", _STRING, ",", '"arguments"', ":")


def _match_header(text: str) -> tuple[str, int] | bool | None:
    """`{"name": "<name>", "arguments":` at the start of `text`: (name, end), None if `text` is a
    prefix of it so far, False if it cannot be one."""
    pos, name = 0, ""
    for piece in _HEADER:
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        if pos == len(text):
            return None
        if piece is _STRING:
            end = _string_end(text, pos) if text[pos] == '"' else False
            if end is None or end is False:
                return end
            try:
                name = json.loads(text[pos:end])
            except ValueError:
                return False
            pos = end
        else:
            got = text[pos:pos + len(piece)]  # type: ignore[arg-type]
            if not piece.startswith(got):  # type: ignore[union-attr]
                return False
            if len(got) < len(piece):  # type: ignore[arg-type]
                return None
            pos += len(got)
    return name, pos


class CallScanner:
    """A constrained response, one call object: its header, then its arguments as they grow. Output
    that is not a call object (a grammar that was not enforced) is read as `AutoScanner` reads it."""

    def __init__(self, tools: Sequence[FunctionTool], new_id: Callable[[], str] = new_call_id) -> None:
        self._tools, self._new_id = tools, new_id
        self._held = ""  # text before the header is complete
        self._header_done = False
        self._fallback: AutoScanner | None = None
        self._depth, self._in_string, self._escaped = 0, False, False
        self._started = self._done = self._primitive = False
        self.num_calls = 0

    def feed(self, text: str) -> list[Event]:
        if self._fallback is not None:
            return self._fallback.feed(text)
        if not self._header_done:
            self._held += text
            match = _match_header(self._held)
            if match is None:
                return []
            if match is False:
                self._fallback = AutoScanner(self._tools, self._new_id)
                return self._fallback.feed(self._held)
            name, end = match  # type: ignore[misc]
            self._header_done, self.num_calls = True, 1
            rest = self._held[end:]
            return [CallDelta(0, "", self._new_id(), name), *self._arguments(rest)]
        return self._arguments(text)

    def _arguments(self, text: str) -> list[Event]:
        out = []
        for c in text:
            if self._done:
                break  # what follows the value is the object's closing brace
            if not self._started:
                if c in _WS:
                    continue
                self._started, self._primitive = True, c not in "{["
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (c == "\\", c != '"')
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]" or (c == "," and self._depth == 0):
                if self._depth == 0:  # the end of a bare value (not an object): not part of it
                    self._done = True
                    break
                self._depth -= 1
                self._done = self._depth == 0 and not self._primitive
            out.append(c)
        return [CallDelta(0, "".join(out))] if out else []

    def finish(self) -> list[Event]:
        if self._fallback is not None:
            return self._fallback.finish()
        if not self._header_done:
            held, self._held = self._held, ""
            return [held] if held else []
        return []


class AutoScanner:
    """Free output: content as it comes, except text that could open a `<tool_call>` block (held
    until decided) and whitespace (held until more content follows; dropped beside calls)."""

    def __init__(self, tools: Sequence[FunctionTool], new_id: Callable[[], str] = new_call_id) -> None:
        self._names = {t.name for t in tools}
        self._new_id = new_id
        self._held = ""
        self._space = ""
        self.num_calls = 0

    def feed(self, text: str) -> list[Event]:
        self._held += text
        out: list[Event] = []
        while True:
            start = self._held.find(CALL_OPEN)
            if start < 0:
                keep = next((k for k in range(min(len(self._held), len(CALL_OPEN) - 1), 0, -1)
                             if CALL_OPEN.startswith(self._held[-k:])), 0)
                self._content(self._held[:len(self._held) - keep], out)
                self._held = self._held[len(self._held) - keep:]
                return out
            self._content(self._held[:start], out)
            end = self._held.find(CALL_CLOSE, start)
            if end < 0:
                self._held = self._held[start:]
                return out
            self._block(self._held[start:end + len(CALL_CLOSE)], self._held[start + len(CALL_OPEN):end], out)
            self._held = self._held[end + len(CALL_CLOSE):]

    def finish(self) -> list[Event]:
        out: list[Event] = []
        held, self._held = self._held, ""
        if held.startswith(CALL_OPEN):  # a block the model did not close: a call if its JSON is whole
            self._block(held, held[len(CALL_OPEN):], out)
        else:
            self._content(held, out)
        if self._space and not self.num_calls:
            out.append(self._space)
        self._space = ""
        return out

    def _content(self, text: str, out: list[Event]) -> None:
        body = text.rstrip(_WS)
        if body:
            out.append(self._space + body)
            self._space = ""
        self._space += text[len(body):]

    def _block(self, whole: str, inner: str, out: list[Event]) -> None:
        calls = self._calls(inner)
        if calls is None:
            self._content(whole, out)
            return
        self._space = ""
        for name, arguments in calls:
            out += [CallDelta(self.num_calls, "", self._new_id(), name), CallDelta(self.num_calls, arguments)]
            self.num_calls += 1

    def _calls(self, inner: str) -> list[tuple[str, str]] | None:
        """(name, arguments JSON) for each call in a block, or None if the block is not calls."""
        try:
            value = json.loads(inner)
        except ValueError:
            return None
        calls = []
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in self._names:
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):  # some models write the arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append((item["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))))
        return calls
