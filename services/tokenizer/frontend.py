"""The front door's core: validate, render, encode, stream from the scheduler, detokenize, stop.

Both public APIs (gRPC `Generation` and the OpenAI-compatible HTTP) call `Frontend.generate`, so
validation, stop strings and usage are the same whichever door a client uses.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Sequence

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.tokenizer.api_types import (  # re-exported: the HTTP API imports them from here
    ChatMessage, GenerateChunk, GenerateInput, SamplingInput, SchedulerEvent, TokenLogprob, Usage,
)
from services.tokenizer.codec import Codec
from services.tokenizer import metrics
from services.tokenizer.detokenizer import IncrementalDetokenizer
from services.tokenizer.scheduler_client import SchedulerClient
from services.tokenizer.stop_checker import StopChecker
from services.tokenizer.validation import validate_input, validate_length

DEFAULT_MAX_TOKENS = 16
_tracer = trace.get_tracer("switchyard.tokenizer")

__all__ = ["ChatMessage", "Frontend", "GenerateChunk", "GenerateInput", "SamplingInput", "TokenLogprob", "Usage"]


class Frontend:
    def __init__(self, codec: Codec, scheduler: SchedulerClient, *, model_name: str) -> None:
        self.codec = codec
        self.scheduler = scheduler
        self.model_name = model_name
        self.max_model_len = codec.max_model_len
        self.vocab_size = codec.vocab_size

    @metrics.timed_tokenize
    def tokenize(self, prompt: str | None = None, messages: Sequence[ChatMessage] | None = None,
                 add_special_tokens: bool = True) -> list[int]:
        if messages is not None:
            return self.codec.encode(self.codec.render_chat([(m.role, m.content) for m in messages]), add_special_tokens)
        return self.codec.encode(prompt or "", add_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.codec.token_text(token_id)

    def prompt_ids(self, inp: GenerateInput) -> list[int]:
        validate_input(inp, self.vocab_size, self.codec.has_chat_template)
        if inp.prompt_token_ids is not None:
            return list(inp.prompt_token_ids)
        return self.tokenize(inp.prompt, inp.messages)

    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerateChunk]:
        """Streams chunks inside one `tokenizer.generate` span (the root of the request's trace)."""
        span = _tracer.start_span("tokenizer.generate", attributes={
            "gen_ai.operation.name": "chat" if inp.messages else "text_completion",
            "gen_ai.request.model": self.model_name,
        })
        finish_reason, num_output_tokens = None, 0
        try:
            async with aclosing(self._generate(inp, span)) as chunks:
                async for chunk in chunks:
                    num_output_tokens += len(chunk.token_ids)
                    finish_reason = chunk.finish_reason or finish_reason
                    if chunk.usage is not None:
                        span.set_attribute("switchyard.cached_tokens", chunk.usage.cached_tokens)
                    yield chunk
        except Exception as e:
            span.set_status(Status(StatusCode.ERROR, str(e)))
            raise
        finally:
            span.set_attributes({"gen_ai.usage.output_tokens": num_output_tokens,
                                 "gen_ai.response.finish_reasons": [finish_reason or "cancelled"]})
            span.end()

    async def _generate(self, inp: GenerateInput, span: trace.Span) -> AsyncIterator[GenerateChunk]:
        prompt_ids = self.prompt_ids(inp)
        max_tokens = inp.sampling.max_tokens
        if max_tokens is None:
            # OpenAI's defaults: 16 for a completion; a chat reply may run until the context is full.
            max_tokens = max(1, self.max_model_len - len(prompt_ids)) if inp.messages else DEFAULT_MAX_TOKENS
            inp = replace(inp, sampling=replace(inp.sampling, max_tokens=max_tokens))
        validate_length(len(prompt_ids), max_tokens, self.max_model_len)
        request_id = inp.request_id or uuid.uuid4().hex
        span.set_attributes({
            "switchyard.request_id": request_id,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.usage.input_tokens": len(prompt_ids),
            **{f"gen_ai.request.{name}": value for name in ("temperature", "top_p", "top_k", "seed")
               if (value := getattr(inp.sampling, name)) is not None},
        })
        detokenizer = IncrementalDetokenizer(self.codec.decoder, prompt_ids)
        stopper = StopChecker(inp.sampling.stop) if inp.sampling.stop else None
        num_output_tokens = num_cached_tokens = 0
        stream = self.scheduler.stream(request_id, prompt_ids, inp, trace.set_span_in_context(span))
        async with aclosing(stream) as events:
            async for event in events:
                num_output_tokens += len(event.token_ids)
                num_cached_tokens = max(num_cached_tokens, event.num_cached_tokens)
                text = detokenizer.push(event.token_ids)
                finish = event.finish_reason
                if finish is not None:
                    text += detokenizer.flush()
                if stopper is not None:
                    text, hit = stopper.push(text)
                    if hit:
                        finish = "stop"  # leaving the `async with` cancels the scheduler stream at once
                    elif finish is not None:
                        text += stopper.flush()
                usage = None
                if finish is not None:
                    usage = Usage(len(prompt_ids), num_output_tokens, num_cached_tokens)
                yield GenerateChunk(request_id, text, event.token_ids, event.logprobs, finish, usage)
                if finish is not None:
                    return
