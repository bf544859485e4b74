"""The front door's core: validate, render, encode, stream from the scheduler, detokenize, stop.

Both public APIs (gRPC `Generation` and the OpenAI-compatible HTTP) call `Frontend.generate`, so
validation, stop strings, usage and the response cache are the same whichever door a client uses.
A cache hit replays the stored chunks as they were streamed the first time (text, token ids,
logprobs, finish reason, usage), so a client cannot tell one from a miss but by the `cache` mark.

`n` > 1 is a fan-out here: n scheduler requests of n=1 on the same prompt ids and cache salt, whose
chunks are merged and tagged with their `index`. They share the prompt's full KV blocks without a
fork in the scheduler, because the scheduler already makes identical prompts on one worker share:
a prompt whose next block another request is computing waits for it and then hits the prefix cache
(`Batcher._computing`). The one thing added is a `sequence_group` that places every sequence on the
worker of the first (the router alone might spread them for load). So the prompt's full blocks are
computed once and referenced by every sequence; each sequence computes only the partial last block
(fewer than block_size tokens) itself, which stands in for copy-on-write of that block. Everything
per sequence (stop strings, detokenizing, the response cache, aborts, resuming on another
scheduler) is the n=1 path, unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Sequence

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.tokenizer.api_types import (  # re-exported: the HTTP API imports them from here
    ChatMessage, FunctionTool, GenerateChunk, GenerateInput, SamplingInput, TokenLogprob, Usage,
)
from services.tokenizer.codec import Codec
from services.tokenizer import metrics
from services.tokenizer.detokenizer import IncrementalDetokenizer
from services.tokenizer.response_cache import CacheControl, ResponseCache, cache_key, is_deterministic
from services.tokenizer.scheduler_client import SchedulerClient
from services.tokenizer.stop_checker import StopChecker
from services.tokenizer.structured_output import grammar_for
from services.tokenizer.validation import validate_input, validate_length

DEFAULT_MAX_TOKENS = 16
_tracer = trace.get_tracer("switchyard.tokenizer")

__all__ = ["ChatMessage", "Frontend", "GenerateChunk", "GenerateInput", "SamplingInput", "TokenLogprob", "Usage"]


class Frontend:
    def __init__(self, codec: Codec, scheduler: SchedulerClient, *, model_name: str,
                 response_cache: ResponseCache | None = None) -> None:
        self.codec = codec
        self.scheduler = scheduler
        self.model_name = model_name
        self.response_cache = response_cache
        if response_cache is not None:
            # Which pools' answers may be served is the scheduler's to say, on its Connect stream.
            scheduler.on_routable = response_cache.set_routable
        self.max_model_len = codec.max_model_len
        self.vocab_size = codec.vocab_size

    @metrics.timed_tokenize
    def tokenize(self, prompt: str | None = None, messages: Sequence[ChatMessage] | None = None,
                 add_special_tokens: bool = True, tools: Sequence[FunctionTool] = ()) -> list[int]:
        if messages is not None:
            return self.codec.encode(self.codec.render_conversation(messages, tools), add_special_tokens)
        return self.codec.encode(prompt or "", add_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.codec.token_text(token_id)

    def prompt_ids(self, inp: GenerateInput) -> list[int]:
        validate_input(inp, self.vocab_size, self.codec.has_chat_template)
        if inp.prompt_token_ids is not None:
            return list(inp.prompt_token_ids)
        return self.tokenize(inp.prompt, inp.messages, tools=inp.tools)

    async def generate(self, inp: GenerateInput, *, tenant: str = "",
                       cache_control: CacheControl = CacheControl()) -> AsyncIterator[GenerateChunk]:
        """Streams chunks inside one `tokenizer.generate` span (the root of the request's trace).
        `tenant` is the caller's API key name ("" without keys): part of the response cache's key."""
        span = _tracer.start_span("tokenizer.generate", attributes={
            "gen_ai.operation.name": "chat" if inp.messages else "text_completion",
            "gen_ai.request.model": self.model_name,
        })
        finish_reason, num_output_tokens = None, 0
        one = inp.sampling.n is None or inp.sampling.n == 1
        try:
            if inp.response_format is not None:
                inp = replace(inp, grammar=grammar_for(inp.response_format))
            generation = (self._generate(inp, span, tenant, cache_control) if one
                          else self._generate_n(inp, span, tenant, cache_control))
            async with aclosing(generation) as chunks:
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

    def _with_max_tokens(self, inp: GenerateInput, prompt_ids: list[int]) -> GenerateInput:
        """`inp` with max_tokens resolved and checked against the model length."""
        max_tokens = inp.sampling.max_tokens
        if max_tokens is None:
            # OpenAI's defaults: 16 for a completion; a chat reply may run until the context is full.
            max_tokens = max(1, self.max_model_len - len(prompt_ids)) if inp.messages else DEFAULT_MAX_TOKENS
            inp = replace(inp, sampling=replace(inp.sampling, max_tokens=max_tokens))
        validate_length(len(prompt_ids), max_tokens, self.max_model_len)
        return inp

    async def _generate_n(self, inp: GenerateInput, span: trace.Span, tenant: str,
                          cache_control: CacheControl) -> AsyncIterator[GenerateChunk]:
        """n > 1: n sequences of n=1, run at once, chunks merged (see the module docstring)."""
        prompt_ids = self.prompt_ids(inp)  # validates n, so every refusal comes before any work
        inp = self._with_max_tokens(inp, prompt_ids)
        request_id = inp.request_id or uuid.uuid4().hex
        n = inp.sampling.n or 1
        span.set_attributes({"switchyard.request_id": request_id, "gen_ai.request.choice.count": n})
        # Encoded once: each sequence sends the ids, so the scheduler sees n equal prompts.
        base = replace(inp, prompt=None, messages=None, prompt_token_ids=tuple(prompt_ids),
                       sampling=replace(inp.sampling, n=None), sequence_group=request_id)
        sequences = [
            self._generate(replace(base, request_id=f"{request_id}/{i}",
                                   sampling=replace(base.sampling, seed=sequence_seed(base.sampling.seed, i))),
                           span, tenant, cache_control)
            for i in range(n)
        ]
        async with aclosing(_merge(request_id, sequences, len(prompt_ids))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _generate(self, inp: GenerateInput, span: trace.Span, tenant: str,
                        cache_control: CacheControl) -> AsyncIterator[GenerateChunk]:
        prompt_ids = self.prompt_ids(inp)
        inp = self._with_max_tokens(inp, prompt_ids)
        max_tokens = inp.sampling.max_tokens
        request_id = inp.request_id or uuid.uuid4().hex
        span.set_attributes({
            "switchyard.request_id": inp.sequence_group or request_id,  # the client's id, also with n > 1
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.usage.input_tokens": len(prompt_ids),
            **{f"gen_ai.request.{name}": value for name in ("temperature", "top_p", "top_k", "seed")
               if (value := getattr(inp.sampling, name)) is not None},
        })
        cache, key, mark = self.response_cache, None, None
        if cache is not None:
            mark = "uncacheable" if not is_deterministic(inp.sampling) else "miss" if cache_control.read else "bypass"
            if mark != "uncacheable":
                key = cache_key(tenant, inp.cache_salt, prompt_ids, inp.sampling, inp.grammar)
            if mark == "miss" and key is not None:
                stored = cache.get(key)
                metrics.observe_cache_lookup(hit=stored is not None)
                if stored is not None:
                    span.set_attribute("switchyard.response_cache", "hit")
                    for chunk in stored:
                        yield replace(chunk, request_id=request_id, cache="hit")
                    return
            span.set_attribute("switchyard.response_cache", mark)
        # The chunks as streamed, to store once the answer is complete (None: it will not be stored).
        recorded: list[GenerateChunk] | None = [] if key is not None and cache_control.write else None
        detokenizer = IncrementalDetokenizer(self.codec.decoder, prompt_ids)
        stopper = StopChecker(inp.sampling.stop) if inp.sampling.stop else None
        num_output_tokens = num_cached_tokens = 0
        served_by = None
        stream = self.scheduler.stream(request_id, prompt_ids, inp, trace.set_span_in_context(span))
        async with aclosing(stream) as events:
            async for event in events:
                served_by = event.served_by or served_by
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
                chunk = GenerateChunk(request_id, text, event.token_ids, event.logprobs, finish, usage, mark)
                if recorded is not None:  # only made with a key, so with a cache
                    recorded.append(replace(chunk, request_id="", cache=None))
                    if finish is not None and served_by is not None:
                        # Stored before the last chunk goes out: the answer is complete, whether or
                        # not this client stays for it. The cache refuses an "abort".
                        cache.put(key, recorded, served_by)
                yield chunk
                if finish is not None:
                    return


def sequence_seed(seed: int | None, index: int) -> int | None:
    """Sequence `index`'s seed: the request's own for sequence 0 (so n=1 and choice 0 agree), and
    for the others one derived from (seed, index), so sequences differ yet repeat run after run."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, person=b"switchyard-n").digest()
    return int.from_bytes(digest, "big", signed=True)  # any int64 is a valid seed


async def _merge(request_id: str, sequences: list[AsyncIterator[GenerateChunk]],
                 num_prompt_tokens: int) -> AsyncIterator[GenerateChunk]:
    """The chunks of n sequences as they come, each tagged with its index. Usage is held back to
    the last chunk of all, with the prompt counted once (cached tokens as sequence 0 saw them) and
    every sequence's completion tokens. A failure of any sequence fails the request; closing this
    iterator (client gone, deadline) closes every sequence, which aborts each in the scheduler."""
    queue: asyncio.Queue[tuple[int, GenerateChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, sequence: AsyncIterator[GenerateChunk]) -> None:
        try:
            async with aclosing(sequence) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((index, chunk, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, None, e))
        else:
            queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i, sequence)) for i, sequence in enumerate(sequences)]
    try:
        num_open, num_finished, num_completion_tokens = len(tasks), 0, 0
        num_cached_tokens = 0
        while num_open:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                num_open -= 1
                continue
            usage = None
            if chunk.usage is not None:
                num_finished += 1
                num_completion_tokens += chunk.usage.completion_tokens
                if index == 0:
                    num_cached_tokens = chunk.usage.cached_tokens
                if num_finished == len(tasks):
                    usage = Usage(num_prompt_tokens, num_completion_tokens, num_cached_tokens)
            yield replace(chunk, request_id=request_id, index=index, usage=usage)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
