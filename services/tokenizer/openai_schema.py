"""OpenAI request bodies in, `GenerateInput` out; OpenAI responses, chunks and error bodies back.

Only the HTTP API imports this module. Request models ignore fields they do not know (as vLLM
does), refuse the ones whose meaning Switchyard cannot honour (best_of > n, echo, suffix, ...) rather
than silently dropping them, and leave range checks to `validation.py`, so that a bad temperature
gets the same message over HTTP and over gRPC. Field names in errors are the OpenAI ones (see
`http_param`): "sampling.top_p" from the front door reaches an HTTP client as param "top_p".
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from services.tokenizer.api_types import ResponseFormat, ToolCall
from services.tokenizer.frontend import ChatMessage, GenerateInput, SamplingInput, TokenLogprob, Usage
from services.tokenizer.structured_output import from_openai, grammar_for
from services.tokenizer.tool_calls import ToolUse, call_object, tool_use
from shared.errors import (
    DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, SwitchyardError,
    Unauthenticated, Unavailable,
)

from shared.telemetry import current_trace_id

logger = logging.getLogger(__name__)

# The OpenAI default for the legacy completions endpoint; chat leaves it to the front door.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields both endpoints share, OpenAI's and the vLLM-style extras."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: int | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # Checked by structured_output.from_openai, so its errors name the exact sub-field.
    response_format: Any = None
    # Switchyard extras: pool stickiness, prefix-cache isolation, queue order.
    session_id: str = ""
    cache_salt: str = ""
    priority: int = 0

    def check_common(self, model_name: str) -> None:
        if self.model is not None and self.model != model_name:
            raise InvalidArgument(f"The model `{self.model}` does not exist.", field="model")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("only allowed when stream is true", field="stream_options")

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} object as sorted (id, bias) pairs; ranges are validation.py's."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            # JSON object keys are strings; only plain decimal ids are ids ("+5", " 5", "5_0" are not).
            if not re.fullmatch(r"-?[0-9]{1,19}", key):
                raise InvalidArgument(f"keys must be token ids (decimal integers), got {key[:32]!r}", field="logit_bias")
            pairs.append((int(key), bias))
        return tuple(sorted(pairs))

    def http_param(self, field: str) -> str:
        """The OpenAI name of a `GenerateInput` field named in a front-door error."""
        if field.startswith("sampling."):
            return field.removeprefix("sampling.")
        if field == "prompt_token_ids":
            return "prompt"
        return field

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingInput:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingInput(
            max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, logprobs=logprobs,
            logit_bias=self.logit_bias_pairs(), n=self.n,
        )


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_input(self, request_id: str, model_name: str) -> GenerateInput:
        self.check_common(model_name)
        if self.echo:
            raise InvalidArgument("echo is not supported", field="echo")
        n = 1 if self.n is None else self.n
        # best_of > n would generate sequences only to throw them away by a score; not supported.
        if self.best_of is not None and self.best_of != n:
            raise InvalidArgument(f"must equal n ({n}) or be left out: only the n sequences returned are "
                                  f"generated, got best_of={self.best_of}", field="best_of")
        if self.suffix:
            raise InvalidArgument("is not supported", field="suffix")
        prompt, prompt_token_ids = _one_prompt(self.prompt)
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        return GenerateInput(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
            sampling=self.sampling(max_tokens=max_tokens, logprobs=self.logprobs),
            session_id=self.session_id, cache_salt=self.cache_salt, priority=self.priority,
            response_format=from_openai(self.response_format),
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class FunctionCallParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class ToolCallParam(BaseModel):
    """A call in an earlier assistant message."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessageParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        for part in content if isinstance(content, list) else ():
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, got type {part.type!r}")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def to_message(self) -> ChatMessage:
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return ChatMessage(self.role, self.text(), calls, self.tool_call_id or "")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessageParam]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # Accepted and ignored: an "auto" answer may hold several calls, a forced one holds one.
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated forms of tools and tool_choice: refused rather than silently dropped.
    functions: Any = None
    function_call: Any = None

    def tool_use(self) -> ToolUse | None:
        """The tools in play (checked), or None; the HTTP API reads the output with it."""
        return tool_use(self.tools, self.tool_choice)

    def to_input(self, request_id: str, model_name: str) -> GenerateInput:
        self.check_common(model_name)
        for legacy, instead in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(self, legacy) is not None:
                raise InvalidArgument(f"is deprecated and not supported; send {instead} instead", field=legacy)
        tools = self.tool_use()
        response_format = from_openai(self.response_format)
        if tools is not None and tools.constrained:
            if response_format is not None:
                raise InvalidArgument("a forced call (required or a named function) already fixes the output's "
                                      "format; it cannot be combined with a response_format", field="tool_choice")
            response_format = _forced_call_format(tools)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("needs logprobs set to true", field="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        messages = tuple(m.to_message() for m in self.messages)
        return GenerateInput(
            request_id=request_id, messages=messages,
            sampling=self.sampling(max_tokens=max_tokens, logprobs=logprobs),
            session_id=self.session_id, cache_salt=self.cache_salt, priority=self.priority,
            response_format=response_format, tools=tools.tools if tools is not None else (),
        )

    def http_param(self, field: str) -> str:
        if field == "sampling.max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        if field == "sampling.logprobs":
            return "top_logprobs"
        return super().http_param(field)


def _forced_call_format(tools: ToolUse) -> ResponseFormat:
    """A forced call ("required", or a named function) is held to its schema by constrained decoding.
    Each function's schema is compiled here once on its own, so one the grammar compiler cannot take
    is refused naming its `tools[i]` rather than a response_format the client never sent."""
    for i, tool in tools.forced_tools():
        try:
            grammar_for(ResponseFormat("json_schema", json.dumps(call_object(tool))))
        except InvalidArgument as e:
            reason = e.message.split(": ", 1)[-1]
            raise InvalidArgument(f"cannot be used for a forced call: {reason}",
                                  field=f"tools[{i}].function.parameters") from None
    return ResponseFormat("json_schema", json.dumps(tools.call_schema(), separators=(",", ":")))


def _one_prompt(prompt: str | list[int] | list[str] | list[list[int]],
                ) -> tuple[str | None, tuple[int, ...] | None]:
    """One text or one list of ids; a batch of prompts is refused, since a request has one stream."""
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise InvalidArgument("must not be empty", field="prompt")
    if all(isinstance(p, int) for p in prompt):
        return None, tuple(prompt)  # type: ignore[arg-type]
    if len(prompt) != 1:
        raise InvalidArgument(f"batched prompts are not supported: send one prompt per request (got {len(prompt)})",
                              field="prompt")
    only = prompt[0]
    return (only, None) if isinstance(only, str) else (None, tuple(only))  # type: ignore[arg-type]


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built up chunk by chunk.

    `text_offset` counts characters from the start of the completion, as vLLM does without echo.
    """

    def __init__(self, token_text: Callable[[int], str]) -> None:
        self._token_text = token_text
        self._offset = 0

    def render(self, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in zip(token_ids, logprobs):
            token = self._token_text(token_id)
            top = {self._token_text(t): v for t, v in zip(lp.top_token_ids, lp.top_logprobs)}
            top.setdefault(token, lp.logprob)
            out["tokens"].append(token)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)
            self._offset += len(token)
        return out


def chat_logprobs(token_text: Callable[[int], str], token_ids: tuple[int, ...],
                  logprobs: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    """Chat `logprobs.content` entries for some tokens."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [
        {**entry(token_id, lp.logprob),
         "top_logprobs": [entry(t, v) for t, v in zip(lp.top_token_ids, lp.top_logprobs)]}
        for token_id, lp in zip(token_ids, logprobs)
    ]


Endpoint = Literal["completions", "chat"]


def choice(endpoint: Endpoint, *, text: str | None, logprobs: Any, finish_reason: str | None, stream: bool,
           first: bool = False, index: int = 0, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One entry of `choices`, in the shape of the endpoint and of streaming or not; `index` is the
    sequence's (n > 1). A chat message or delta has `content` unless `text` is None, and
    `tool_calls` when some are given (whole calls, or a stream's `tool_calls` deltas)."""
    if endpoint == "completions":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    body: dict[str, Any] = {"index": index}
    if stream:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        body["delta"] = delta
    else:
        body["message"] = {"role": "assistant", "content": text}
        if tool_calls:
            body["message"]["tool_calls"] = tool_calls
    body["logprobs"] = None if logprobs is None else {"content": logprobs}
    body["finish_reason"] = finish_reason
    return body


def envelope(endpoint: Endpoint, *, response_id: str, created: int, model: str, stream: bool,
             choices: list[dict[str, Any]], usage: dict[str, Any] | None, with_usage: bool) -> dict[str, Any]:
    if endpoint == "completions":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if stream else "chat.completion"
    body: dict[str, Any] = {"id": response_id, "object": obj, "created": created, "model": model, "choices": choices}
    if with_usage:
        body["usage"] = usage
    return body


# Typed error -> (HTTP status, OpenAI error type). First match wins; anything else is a bug (500).
_STATUS: tuple[tuple[type[SwitchyardError], int, str], ...] = (
    (InvalidArgument, 400, "invalid_request_error"),
    (FailedPrecondition, 400, "invalid_request_error"),
    (NotFound, 404, "invalid_request_error"),
    (Unauthenticated, 401, "authentication_error"),
    (ResourceExhausted, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable_error"),
    (DeadlineExceeded, 504, "timeout_error"),
)


class HttpError(Exception):
    """A refusal that only exists over HTTP (body too large, body not JSON)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _printable(text: str | None) -> str | None:
    """A message may quote the client's input, which JSON lets hold lone surrogates ("\\ud800") that
    no UTF-8 encoder takes; they are shown escaped so the error body itself can still be sent."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, err_type: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    error = {"message": _printable(message), "type": err_type, "param": _printable(param), "code": code}
    return status, {"error": error}, headers or {}


def describe_error(exc: BaseException, param_of: Callable[[str], str] | None = None,
                   ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI error body and headers for any exception; unknown ones are logged, not shown."""
    if isinstance(exc, HttpError):
        return error_body(exc.status, exc.message, "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        param = param_from_loc(first["loc"])
        message = f"{param}: {first['msg']}" if param else f"request body: {first['msg']}"
        return error_body(400, message, "invalid_request_error", param)
    if isinstance(exc, SwitchyardError):
        for cls, status, err_type in _STATUS:
            if isinstance(exc, cls):
                param = param_of(exc.field) if exc.field and param_of else exc.field
                headers = {}
                if isinstance(exc, ResourceExhausted):
                    headers = {"Retry-After": str(math.ceil(exc.retry_after_s)),
                               "retry-after-ms": str(round(exc.retry_after_s * 1000))}
                message = exc.message
                if param != exc.field and message.startswith(f"{exc.field}: "):
                    message = f"{param}: {message.removeprefix(f'{exc.field}: ')}"  # speak the OpenAI names
                code = "model_not_found" if param == "model" else None
                return error_body(status, message, err_type, param, code, headers)
    # A bug: the client gets an id to quote, the traceback stays in the log next to it.
    error_id, trace_id = uuid.uuid4().hex[:8], current_trace_id()
    logger.error("unexpected error in the HTTP API (error id %s, trace id %s)", error_id, trace_id or "-",
                 exc_info=exc)
    where = f"error id {error_id}, trace id {trace_id}" if trace_id else f"error id {error_id}"
    return error_body(500, f"internal error ({where})", "server_error", code="internal_error")


def param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    """`("messages", 0, "content")` -> "messages[0].content"; union tags like "list[int]" are skipped."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in ("str", "int", "float", "bool", "list", "dict"):
            param += f".{part}" if param else part
    return param or None
