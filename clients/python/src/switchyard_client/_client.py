"""`Client` (blocking) and `AsyncClient` (asyncio) over `switchyard.api.v1.Generation`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Unpack

import grpc
import grpc.aio

from ._channel import channel_options, credentials
from .errors import error_from_rpc_error
from .proto import generation_pb2 as pb
from .proto import generation_pb2_grpc
from .types import (
    ChatMessage, FinishReason, GenerateChunk, GenerateOptions, ModelInfo, RetryPolicy, Tls, TokenLogprob, Usage,
)

__all__ = ["Client", "AsyncClient", "DEFAULT_TIMEOUT_S", "DEFAULT_STREAM_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 30.0  # Tokenize, GetModelInfo
DEFAULT_STREAM_TIMEOUT_S = 300.0  # a whole Generate stream, first token to last
_UNSET: Any = object()  # "the client's default timeout", as distinct from None (no deadline)

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "logprobs", "n")
_REQUEST_FIELDS = ("request_id", "session_id", "cache_salt", "priority")
_CALL_FIELDS = ("timeout", "metadata")
_KNOWN = frozenset(_SAMPLING_FIELDS + _REQUEST_FIELDS + _CALL_FIELDS
                   + ("stop", "stop_token_ids", "logit_bias", "response_format"))
_FINISH: dict[int, FinishReason | None] = {
    pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort",
}

Messages = Sequence[ChatMessage | Mapping[str, str]]


def _messages_pb(messages: Messages) -> pb.ChatMessages:
    if isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty sequence of ChatMessage or {'role', 'content'} dicts")
    turns = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, ChatMessage) else (m["role"], m["content"])
        turns.append(pb.ChatMessage(role=role, content=content))
    return pb.ChatMessages(messages=turns)


def _generate_request(prompt: str | Sequence[int] | None, messages: Messages | None,
                      options: Mapping[str, Any]) -> pb.GenerateRequest:
    unknown = set(options) - _KNOWN
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    sampling = pb.SamplingParams(**{k: options[k] for k in _SAMPLING_FIELDS if options.get(k) is not None})
    sampling.stop.extend(options.get("stop") or ())
    sampling.stop_token_ids.extend(options.get("stop_token_ids") or ())
    for token_id, bias in (options.get("logit_bias") or {}).items():
        sampling.logit_bias[int(token_id)] = float(bias)
    request = pb.GenerateRequest(sampling=sampling,
                                 **{k: options[k] for k in _REQUEST_FIELDS if options.get(k) is not None})
    if messages is not None:
        request.messages.CopyFrom(_messages_pb(messages))
    elif isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.ids.extend(prompt)
    fmt = options.get("response_format")
    if isinstance(fmt, str):
        request.response_format.type = fmt
    elif fmt is not None:
        request.response_format.type = "json_schema"
        request.response_format.json_schema = json.dumps(fmt)
    return request


def _tokenize_request(prompt: str | None, messages: Messages | None, add_special_tokens: bool) -> pb.TokenizeRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("tokenize takes exactly one of prompt or messages")
    request = pb.TokenizeRequest(add_special_tokens=add_special_tokens)
    if messages is not None:
        request.messages.CopyFrom(_messages_pb(messages))
    else:
        request.prompt = prompt  # type: ignore[assignment]
    return request


def _chunk(response: pb.GenerateResponse) -> GenerateChunk:
    usage = None
    if response.HasField("usage"):
        u = response.usage
        usage = Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                      cached_tokens=u.cached_tokens)
    return GenerateChunk(
        text=response.text, token_ids=tuple(response.token_ids), index=response.index,
        finish_reason=_FINISH.get(response.finish_reason), usage=usage, request_id=response.request_id,
        logprobs=tuple(TokenLogprob(lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs))
                       for lp in response.logprobs),
    )


def _model_info(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                     version=info.version)


class _Base:
    def __init__(self, address: str, *, api_key: str | None, tls: Tls | None, insecure: bool,
                 retry: RetryPolicy | None, timeout: float | None, stream_timeout: float | None,
                 options: list[tuple[str, Any]] | None) -> None:
        self.address = address
        self._credentials, self._metadata = credentials(address, api_key, tls, insecure)
        self._options = channel_options(retry, tls, options)
        self._timeout = timeout
        self._stream_timeout = stream_timeout

    def _call_args(self, options: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        timeout = options["timeout"] if "timeout" in options else (self._stream_timeout if stream else self._timeout)
        return {"timeout": timeout, "metadata": [*self._metadata, *(options.get("metadata") or ())] or None}


class Client(_Base):
    """A blocking client of a Switchyard front door.

    ```python
    with Client("127.0.0.1:50051", api_key="sk-...") as client:
        for chunk in client.chat([{"role": "user", "content": "Hi"}], max_tokens=32):
            print(chunk.text, end="")
    ```

    `address` is host:port (or unix:path). Without `tls`, a loopback or unix address gets a plaintext
    channel with gRPC's local credentials and any other address TLS with the system's roots; give
    `tls=Tls(ca_file=...)` for a private CA (and `cert_file`/`key_file` for mutual TLS), or
    `insecure=True` for plaintext to another machine. `api_key` is sent as `authorization: Bearer`.
    `timeout` bounds unary calls and `stream_timeout` a whole Generate stream (seconds; None: no
    deadline); every method takes `timeout=` to override. `retry` is gRPC's retry policy for
    UNAVAILABLE and RESOURCE_EXHAUSTED before the first response (None: no retries). `options` are
    extra gRPC channel options. Failed calls raise `switchyard_client.errors.SwitchyardError` subclasses.
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: Tls | None = None,
                 insecure: bool = False, retry: RetryPolicy | None = RetryPolicy(),
                 timeout: float | None = DEFAULT_TIMEOUT_S, stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
                 options: list[tuple[str, Any]] | None = None) -> None:
        super().__init__(address, api_key=api_key, tls=tls, insecure=insecure, retry=retry, timeout=timeout,
                         stream_timeout=stream_timeout, options=options)
        if self._credentials is None:
            self.channel: grpc.Channel = grpc.insecure_channel(address, options=self._options)
        else:
            self.channel = grpc.secure_channel(address, self._credentials, options=self._options)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self.channel.close()

    def generate(self, prompt: str | Sequence[int], **options: Unpack[GenerateOptions]) -> Iterator[GenerateChunk]:
        """Streams the completion of `prompt` (text, or token ids) as `GenerateChunk`s.

        Leaving the loop early (or closing the iterator) cancels the request on the server.
        """
        return self._stream(_generate_request(prompt, None, options), options)

    def chat(self, messages: Messages, **options: Unpack[GenerateOptions]) -> Iterator[GenerateChunk]:
        """Streams the assistant's answer to `messages`, rendered with the model's chat template."""
        return self._stream(_generate_request(None, messages, options), options)

    def tokenize(self, prompt: str | None = None, *, messages: Messages | None = None,
                 add_special_tokens: bool = False, timeout: float | None = _UNSET) -> list[int]:
        """Token ids of `prompt`, or of `messages` rendered with the chat template."""
        call = self._call_args({} if timeout is _UNSET else {"timeout": timeout}, stream=False)
        try:
            return list(self.stub.Tokenize(_tokenize_request(prompt, messages, add_special_tokens), **call).token_ids)
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from e

    def model_info(self, *, timeout: float | None = _UNSET) -> ModelInfo:
        """The served model's name, length limit, vocabulary size and version."""
        call = self._call_args({} if timeout is _UNSET else {"timeout": timeout}, stream=False)
        try:
            return _model_info(self.stub.GetModelInfo(pb.GetModelInfoRequest(), **call))
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from e

    def _stream(self, request: pb.GenerateRequest, options: Mapping[str, Any]) -> Iterator[GenerateChunk]:
        call = self.stub.Generate(request, **self._call_args(options, stream=True))
        try:
            for response in call:
                yield _chunk(response)
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from e
        finally:
            call.cancel()  # no-op once the stream ended; aborts the request if the caller stopped early


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same arguments, `await`able unary calls, and `generate`/`chat`
    as async iterators.

    ```python
    async with AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="")
    ```

    Create it inside the event loop that uses it.
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: Tls | None = None,
                 insecure: bool = False, retry: RetryPolicy | None = RetryPolicy(),
                 timeout: float | None = DEFAULT_TIMEOUT_S, stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
                 options: list[tuple[str, Any]] | None = None) -> None:
        super().__init__(address, api_key=api_key, tls=tls, insecure=insecure, retry=retry, timeout=timeout,
                         stream_timeout=stream_timeout, options=options)
        if self._credentials is None:
            self.channel: grpc.aio.Channel = grpc.aio.insecure_channel(address, options=self._options)
        else:
            self.channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self.channel.close(None)  # no grace

    def generate(self, prompt: str | Sequence[int],
                 **options: Unpack[GenerateOptions]) -> AsyncIterator[GenerateChunk]:
        """Streams the completion of `prompt` (text, or token ids); see `Client.generate`."""
        return self._stream(_generate_request(prompt, None, options), options)

    def chat(self, messages: Messages, **options: Unpack[GenerateOptions]) -> AsyncIterator[GenerateChunk]:
        """Streams the assistant's answer to `messages`; see `Client.chat`."""
        return self._stream(_generate_request(None, messages, options), options)

    async def tokenize(self, prompt: str | None = None, *, messages: Messages | None = None,
                       add_special_tokens: bool = False, timeout: float | None = _UNSET) -> list[int]:
        """Token ids of `prompt`, or of `messages` rendered with the chat template."""
        call = self._call_args({} if timeout is _UNSET else {"timeout": timeout}, stream=False)
        try:
            response = await self.stub.Tokenize(_tokenize_request(prompt, messages, add_special_tokens), **call)
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from e
        return list(response.token_ids)

    async def model_info(self, *, timeout: float | None = _UNSET) -> ModelInfo:
        """The served model's name, length limit, vocabulary size and version."""
        call = self._call_args({} if timeout is _UNSET else {"timeout": timeout}, stream=False)
        try:
            return _model_info(await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **call))
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from e

    async def _stream(self, request: pb.GenerateRequest, options: Mapping[str, Any]) -> AsyncIterator[GenerateChunk]:
        call = self.stub.Generate(request, **self._call_args(options, stream=True))
        try:
            async for response in call:
                yield _chunk(response)
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from e
        finally:
            call.cancel()

