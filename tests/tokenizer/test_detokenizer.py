"""IncrementalDetokenizer: the deltas always add up to a full decode, and the window stays small.

`hypothesis` is not in the pinned environment, so the property tests are seeded random loops
over thousands of id sequences pushed in random-sized groups (empty groups included).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import transformers

from services.tokenizer.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"
TEXTS = (
    "héllo wörld, naïve café — Ærøskøbing",
    "你好，世界！今天天气很好。東京と大阪",
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 skin 👍🏽",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, 한국어",
    "combining e\u0301 a\u0308 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ plain ascii too",
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))


class CountingDecoder:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.window_lengths: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.window_lengths.append(len(token_ids))
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def byte_token_ids(tokenizer) -> dict[int, int]:
    """Byte value -> id of the single-byte token (GPT-2's printable byte alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {b: tokenizer.convert_tokens_to_ids(c) for b, c in chars.items()}


def random_groups(rng: random.Random, ids: Sequence[int], max_group: int) -> list[list[int]]:
    groups, i = [], 0
    while i < len(ids):
        size = rng.randint(0, max_group)
        groups.append(list(ids[i : i + size]))
        i += size
    return groups


def run_checked(
    tokenizer,
    groups: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[int] = (),
    skip_special_tokens: bool = True,
) -> str:
    """Pushes the groups, checks every intermediate state, returns all text including flush.

    Without a prompt, after each push the text so far must be a prefix of the decode so far,
    and must stop short of a trailing U+FFFD: that may be a partial character still to come.
    """
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
    emitted, pushed = "", []
    for group in groups:
        emitted += detok.push(group)
        pushed.extend(group)
        if prompt_token_ids:
            continue
        so_far = tokenizer.decode(pushed, skip_special_tokens=skip_special_tokens)
        assert so_far.startswith(emitted), (pushed, emitted, so_far)
        if so_far.endswith(REPLACEMENT):
            assert len(emitted) < len(so_far), (pushed, emitted)
    return emitted + detok.flush()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_from_whole_vocab_add_up_to_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1234 + skip_special_tokens)
    for _ in range(1500):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        text = run_checked(tokenizer, random_groups(rng, ids, 5), (), skip_special_tokens)
        assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_bytes_split_and_break_characters(tokenizer, skip_special_tokens):
    """Single-byte tokens, mostly >= 0x80: partial, completed and invalid sequences galore."""
    rng = random.Random(99 + skip_special_tokens)
    byte_ids = byte_token_ids(tokenizer)
    high = [byte_ids[b] for b in range(0x80, 0x100)]
    ascii_ = [byte_ids[b] for b in b"ab "]
    special = list(tokenizer.all_special_ids)
    for _ in range(1500):
        ids = [
            rng.choice(high if r < 0.8 else ascii_ if r < 0.95 else special)
            for r in (rng.random() for _ in range(rng.randint(1, 30)))
        ]
        text = run_checked(tokenizer, random_groups(rng, ids, 3), (), skip_special_tokens)
        assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_multibyte_text_one_token_at_a_time(tokenizer):
    ids_per_text = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    # The test only means something if some token really holds part of a character.
    assert any(REPLACEMENT in tokenizer.decode([i]) for ids in ids_per_text for i in ids)
    for text, ids in zip(TEXTS, ids_per_text, strict=True):
        assert run_checked(tokenizer, [[i] for i in ids]) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_mixed_into_text(tokenizer, skip_special_tokens):
    rng = random.Random(7 + skip_special_tokens)
    special = list(tokenizer.all_special_ids)
    for _ in range(300):
        ids = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False)
        for _ in range(rng.randint(1, 4)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(special))
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        text = run_checked(tokenizer, random_groups(rng, ids, 3), (), skip_special_tokens)
        assert text == expected
        assert ("<s>" in text) == (not skip_special_tokens and tokenizer.bos_token_id in ids)


def test_prompt_gives_context_but_no_text(tokenizer):
    rng = random.Random(5)
    for _ in range(500):
        prompt_ids = tokenizer.encode(rng.choice(TEXTS))  # with BOS
        if rng.random() < 0.5:
            ids = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False)
        else:
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 30))]
        text = run_checked(tokenizer, random_groups(rng, ids, 4), prompt_ids)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        assert prompt_text + text == tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)


def test_character_split_between_prompt_and_completion_is_completion_text(tokenizer):
    ids = tokenizer.encode("ab 你", add_special_tokens=False)
    first_partial = next(
        n for n in range(len(ids)) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT)
    )
    detok = IncrementalDetokenizer(tokenizer, ids[:first_partial])
    text = "".join(detok.push([i]) for i in ids[first_partial:]) + detok.flush()
    assert text == "你"


def test_empty_pushes_and_flush(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push([]) == ""
    assert detok.flush() == ""
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1
    assert detok.push(ids[:1]) == ""
    assert detok.flush() == tokenizer.decode(ids[:1])  # held partial character, as decoded


def test_push_one_token_at_a_time_uses_a_bounded_window(tokenizer):
    """5,000 tokens pushed singly: every decode sees a few ids, so the cost is linear."""
    long_text = " ".join(TEXTS * 200)
    ids = tokenizer.encode(long_text, add_special_tokens=False)[:5000]
    assert len(ids) == 5000
    counting = CountingDecoder(tokenizer)
    prompt_ids = tokenizer.encode(long_text)[:3000]
    detok = IncrementalDetokenizer(counting, prompt_ids)
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(counting.window_lengths) <= 12
    assert sum(counting.window_lengths) <= 10 * len(ids)


def test_invalid_bytes_do_not_stall_the_stream(tokenizer):
    """A run of stray continuation bytes never completes: it is released, not held forever."""
    byte_ids = byte_token_ids(tokenizer)
    ids = [byte_ids[0x80 + i % 64] for i in range(5000)]
    counting = CountingDecoder(tokenizer)
    detok = IncrementalDetokenizer(counting)
    deltas = [detok.push([i]) for i in ids]
    assert sum(len(d) for d in deltas) >= 5000 - 8
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)
    assert max(counting.window_lengths) <= 12
    assert sum(counting.window_lengths) <= 20 * len(ids)


def test_the_codec_decodes_with_the_rust_tokenizer_and_gets_the_same_text(tiny_model_dir, tokenizer):
    from services.tokenizer.codec import Codec  # noqa: PLC0415 - the codec is what is under test here

    codec = Codec(tiny_model_dir)
    assert codec.decoder is codec.tokenizer.backend_tokenizer
    rng = random.Random(5)
    byte_ids = byte_token_ids(tokenizer)
    for _ in range(500):
        ids = [rng.randrange(len(tokenizer)) if rng.random() < 0.5 else byte_ids[rng.randrange(0x80, 0x100)]
               for _ in range(rng.randint(1, 30))]
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 6))]
        text = run_checked(codec.decoder, random_groups(rng, ids, 4), prompt)
        assert text == run_checked(tokenizer, random_groups(rng, ids, 4), prompt), (prompt, ids)
        if not prompt:
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
