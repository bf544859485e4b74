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

from services.tokenizer.api_types import (  # re-exported: the HTTP API imports them from here
    ChatMessage, GenerateChunk, GenerateInput, SamplingInput, SchedulerEvent, TokenLogprob, Usage,
)
from services.tokenizer.codec import Codec
from services.tokenizer.detokenizer import IncrementalDetokenizer
from services.tokenizer.scheduler_client import SchedulerClient
from services.tokenizer.stop_checker import StopChecker
from services.tokenizer.validation import validate_input, validate_length

DEFAULT_MAX_TOKENS = 16

__all__ = ["ChatMessage", "Frontend", "GenerateChunk", "GenerateInput", "SamplingInput", "TokenLogprob", "Usage"]


class Frontend:
    def __init__(self, codec: Codec, scheduler: SchedulerClient, *, model_name: str) -> None:
        self.codec = codec
        self.scheduler = scheduler
        self.model_name = model_name
        self.max_model_len = codec.max_model_len
        self.vocab_size = codec.vocab_size

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
        prompt_ids = self.prompt_ids(inp)
        max_tokens = inp.sampling.max_tokens
        if max_tokens is None:
            # OpenAI's defaults: 16 for a completion; a chat reply may run until the context is full.
            max_tokens = max(1, self.max_model_len - len(prompt_ids)) if inp.messages else DEFAULT_MAX_TOKENS
            inp = replace(inp, sampling=replace(inp.sampling, max_tokens=max_tokens))
        validate_length(len(prompt_ids), max_tokens, self.max_model_len)
        request_id = inp.request_id or uuid.uuid4().hex
        detokenizer = IncrementalDetokenizer(self.codec.tokenizer, prompt_ids)
        stopper = StopChecker(inp.sampling.stop) if inp.sampling.stop else None
        num_output_tokens = num_cached_tokens = 0
        async with aclosing(self.scheduler.stream(request_id, prompt_ids, inp)) as events:
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
