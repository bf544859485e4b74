"""The front door's merge of n sequences, on scripted sequences: indexes, usage held to the very
last chunk, one failure failing the request, and closing that closes every sequence."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from services.tokenizer.frontend import GenerateChunk, Usage, _merge
from shared.errors import Unavailable

pytestmark = pytest.mark.asyncio(loop_scope="session")


def chunk(text: str, finish: str | None = None, completion_tokens: int = 0, cached_tokens: int = 0) -> GenerateChunk:
    usage = Usage(5, completion_tokens, cached_tokens) if finish else None
    return GenerateChunk("inner", text, (1,), (), finish, usage)


class Script:
    """A sequence that yields its chunks with a pause between them and records being closed."""

    def __init__(self, chunks: list[GenerateChunk], pause_s: float = 0.0, error: Exception | None = None) -> None:
        self.chunks, self.pause_s, self.error = chunks, pause_s, error
        self.closed = False

    async def run(self):
        try:
            for c in self.chunks:
                await asyncio.sleep(self.pause_s)
                yield c
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


async def test_chunks_carry_their_index_and_usage_waits_for_the_last_sequence() -> None:
    scripts = [Script([chunk("a"), chunk("b", "length", 2, cached_tokens=0)], 0.01),
               Script([chunk("x", "stop", 1, cached_tokens=16)], 0.0),
               Script([chunk("p"), chunk("q"), chunk("r", "length", 3, cached_tokens=16)], 0.02)]
    merged = [c async for c in _merge("req", [s.run() for s in scripts], num_prompt_tokens=5)]
    assert {c.request_id for c in merged} == {"req"}
    assert ["".join(c.text for c in merged if c.index == i) for i in range(3)] == ["ab", "x", "pqr"]
    assert [c.usage for c in merged[:-1]] == [None] * (len(merged) - 1)
    # The prompt once, cached tokens as sequence 0 saw them, every sequence's completion tokens.
    assert merged[-1].usage == Usage(5, 6, 0) and merged[-1].finish_reason is not None
    assert all(s.closed for s in scripts)


async def test_one_failure_fails_the_request_and_closes_the_others() -> None:
    scripts = [Script([chunk("a")] * 100, 0.01), Script([chunk("x")], 0.0, error=Unavailable("gone"))]
    with pytest.raises(Unavailable):
        async for _ in _merge("req", [s.run() for s in scripts], num_prompt_tokens=5):
            pass
    assert all(s.closed for s in scripts)


async def test_closing_the_merge_closes_every_sequence() -> None:
    scripts = [Script([chunk("a")] * 100, 0.01) for _ in range(3)]
    async with aclosing(_merge("req", [s.run() for s in scripts], num_prompt_tokens=5)) as merged:
        async for _ in merged:
            break
    assert all(s.closed for s in scripts)
