"""Plain dataclasses at the front door's boundaries, shared by the gRPC and HTTP APIs."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.sampling_rules import SamplingFields


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made earlier in a conversation (OpenAI's `tool_calls[i]`)."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI carries it


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call (OpenAI's `tools[i].function`)."""

    name: str
    description: str = ""
    parameters: str = '{"type":"object","properties":{}}'  # JSON schema of the arguments, JSON text


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls (its content may then be "")
    tool_call_id: str = ""  # a "tool" turn: which call this is the result of


SamplingInput = SamplingFields  # the public SamplingParams, one definition for every service


@dataclass(frozen=True)
class ResponseFormat:
    """What shape the output must have (OpenAI's `response_format`): "text" (free), "json_object"
    (any JSON object) or "json_schema" (a JSON value valid against `json_schema`, a JSON text)."""

    type: str = "text"
    json_schema: str = ""


@dataclass(frozen=True)
class GenerateInput:
    request_id: str = ""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingInput = field(default_factory=SamplingInput)
    session_id: str = ""
    cache_salt: str = ""
    priority: int = 0
    timeout_s: float | None = None
    # Set by the front door on each of the n sequences of one request (n > 1), never by a client:
    # the scheduler places a group's requests on one worker, so they share the prompt's blocks.
    sequence_group: str = ""
    response_format: ResponseFormat | None = None
    # Set by the front door from response_format (or tools), never by a client: the llguidance
    # grammar (JSON text) every token must keep the output inside; "" leaves it free.
    grammar: str = ""
    # Functions the chat template renders into the prompt (HTTP `tools` unless tool_choice is "none").
    tools: tuple[FunctionTool, ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class GenerateChunk:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None  # None until the last chunk; then "stop", "length" or "abort"
    usage: Usage | None = None
    # The response cache's part in this answer, for the client to see (a header, metadata): "hit",
    # "miss" (looked up, not there), "bypass" (the client said no-cache or no-store), "uncacheable"
    # (not a deterministic request); None when the cache is off.
    cache: str | None = None
    index: int = 0  # which of the request's n sequences (0-based); usage, with n > 1, is on the last chunk of all


@dataclass(frozen=True)
class ServingPool:
    """A scheduler pool as the front door knows it: what produced an answer, and what is routable."""

    name: str
    version: str  # the pool's model version label


@dataclass(frozen=True)
class SchedulerEvent:
    """One token event from the scheduler, as the front door sees it."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    served_by: ServingPool | None = None  # the pool that computed it (None: a scheduler that does not say)

    def merged(self, later: list[SchedulerEvent]) -> SchedulerEvent:
        """This event followed by `later` ones as one (their tokens in order, the last counts)."""
        last = later[-1]
        return SchedulerEvent(
            token_ids=self.token_ids + tuple(t for e in later for t in e.token_ids),
            logprobs=self.logprobs + tuple(lp for e in later for lp in e.logprobs),
            finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
            num_cached_tokens=max(e.num_cached_tokens for e in (self, *later)),
            served_by=last.served_by or self.served_by,
        )
