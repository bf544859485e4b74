"""Plain values the client returns and takes; nothing here touches protobuf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypedDict

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request (with n > 1: the prompt once, every sequence's completion)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability (nats) of one generated token and its most likely alternatives, best first."""

    logprob: float
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed piece of a completion.

    `text` is the new text since the previous chunk of the same sequence and `token_ids` the new
    tokens. The last chunk of each sequence has `finish_reason` set ("stop": end of sequence, a stop
    token or string; "length": max_tokens or the model's length; "abort": cancelled or failed), and
    the request's last chunk carries `usage`. `index` names the sequence when n > 1.
    """

    text: str
    token_ids: tuple[int, ...]
    index: int = 0
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    request_id: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """The served model: name, longest prompt + output (tokens), vocabulary size, default pool's version."""

    model: str
    max_model_len: int
    vocab_size: int
    version: str


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; `role` is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclass(frozen=True)
class Tls:
    """TLS for the channel. `ca_file`: PEM roots to verify the server with (None: the system's).
    `cert_file` + `key_file`: this client's certificate, for servers that require mutual TLS (a
    Switchyard started with --tls-ca). `server_name`: the name to verify the certificate against when
    it differs from the address's host (e.g. connecting by IP)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("Tls: cert_file and key_file go together")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retry policy (gRFC A6), put on the channel as its service config.

    A call that fails with one of `retryable_status_codes` before the server sent anything (for
    Generate: before the first token) is tried again, up to `max_attempts` in all, after an
    exponential, jittered backoff starting at `initial_backoff_s`; all attempts share the call's
    deadline. Once a response has arrived the call is committed and never retried, so no token is
    ever delivered twice. Retries are throttled per channel (`throttle_max_tokens`,
    `throttle_token_ratio`) so that a failing server is not hammered.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
    throttle_max_tokens: int = 10
    throttle_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError("RetryPolicy.max_attempts must be in [2, 5] (gRPC caps it at 5); "
                             "pass retry=None to turn retries off")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("RetryPolicy backoffs and multiplier must be > 0")


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of `generate` and `chat`. Unset sampling fields take the server's defaults
    (the OpenAI ones: max_tokens 16, temperature 1, top_p 1)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: int  # top alternatives per token, 0-20
    logit_bias: dict[int, float]
    n: int  # independent sequences, 1-16
    # "text", "json_object", or a JSON Schema (a dict) the output must validate against.
    response_format: str | dict[str, Any]
    request_id: str
    session_id: str  # requests of one session stick to one worker pool
    cache_salt: str  # only requests with equal salts share prefix-cache blocks
    priority: int
    timeout: float | None  # seconds; overrides the client's stream_timeout (None: no deadline)
    metadata: list[tuple[str, str]]  # extra gRPC metadata for this call

