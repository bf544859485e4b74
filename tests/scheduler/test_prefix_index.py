"""Prefix index: stable chained keys, full blocks only, token-checked hits, salt and version isolation."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from services.scheduler import prefix_index
from services.scheduler.prefix_index import ROOT_HASH, PrefixIndex, hash_block
from shared.errors import InvalidArgument

BLOCK_SIZE = 4


def make_index(model_version: str = "v1") -> PrefixIndex:
    return PrefixIndex(BLOCK_SIZE, model_version)


def index_prompt(index: PrefixIndex, token_ids: Sequence[int], cache_salt: str = "",
                 first_block_id: int = 1) -> list[int]:
    """Indexes every full block of `token_ids` under consecutive block ids; returns those ids."""
    block_ids = []
    parent_hash = ROOT_HASH
    for i in range(len(token_ids) // BLOCK_SIZE):
        block_tokens = token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
        parent_hash = index.hash_of(parent_hash, block_tokens, cache_salt)
        assert index.insert(parent_hash, first_block_id + i, block_tokens, cache_salt)
        block_ids.append(first_block_id + i)
    return block_ids


def force_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block of every prompt gets the same key, so only the stored-token check tells them apart."""
    monkeypatch.setattr(prefix_index, "hash_block", lambda *args: b"\x01" * 16)


def test_hash_is_stable_across_processes() -> None:
    # A fixed digest: Python's salted hash() would change this between runs.
    assert hash_block(ROOT_HASH, [1, 2, 3, 4], "salt", "v1").hex() == "62aa422bd7ab9638ba55bf89afd1c669"


def test_every_input_changes_the_hash() -> None:
    base = hash_block(ROOT_HASH, [1, 2, 3, 4], "s", "v1")
    assert hash_block(ROOT_HASH, [1, 2, 3, 4], "s", "v1") == base
    variants = [
        hash_block(b"\x02" * 16, [1, 2, 3, 4], "s", "v1"),
        hash_block(ROOT_HASH, [1, 2, 3, 5], "s", "v1"),
        hash_block(ROOT_HASH, [1, 2, 3, 4], "t", "v1"),
        hash_block(ROOT_HASH, [1, 2, 3, 4], "s", "v2"),
    ]
    assert len({base, *variants}) == 5
    # Length-prefixed strings: moving a character from salt to version is a different key.
    assert hash_block(ROOT_HASH, [1], "ab", "c") != hash_block(ROOT_HASH, [1], "a", "bc")


def test_match_returns_longest_full_block_prefix() -> None:
    index = make_index()
    prompt = list(range(10, 22))  # three full blocks
    assert index_prompt(index, prompt) == [1, 2, 3]
    assert index.match(prompt, "") == [1, 2, 3]
    assert index.match(prompt + [99, 98], "") == [1, 2, 3]  # trailing partial block is ignored
    assert index.match(prompt[:7], "") == [1]
    assert index.match(prompt[:4] + [0, 0, 0, 0] + prompt[8:], "") == [1]  # chain: block 3 needs block 2
    assert index.match([0] + prompt[1:], "") == []
    assert index.match([], "") == []


def test_only_full_blocks_are_indexed() -> None:
    index = make_index()
    with pytest.raises(InvalidArgument, match="token_ids"):
        index.insert(b"\x03" * 16, 1, [1, 2, 3], "")
    assert len(index) == 0


def test_hash_hit_with_other_tokens_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    force_collisions(monkeypatch)
    index = make_index()
    index_prompt(index, [1, 2, 3, 4])
    assert index.match([1, 2, 3, 4], "") == [1]
    assert index.match([5, 6, 7, 8], "") == []
    assert index.get(b"\x01" * 16, [5, 6, 7, 8], "") is None
    # The same tokens under another salt collide too, and are refused as well.
    assert index.match([1, 2, 3, 4], "other") == []


def test_salts_never_share_and_equal_salts_do() -> None:
    index = make_index()
    prompt = list(range(8))
    index_prompt(index, prompt, cache_salt="tenant-a")
    assert index.match(prompt, "tenant-a") == [1, 2]
    assert index.match(prompt, "tenant-b") == []
    assert index.match(prompt, "") == []


def test_model_versions_never_share() -> None:
    old, new = make_index("v1"), make_index("v2")
    prompt = list(range(8))
    index_prompt(old, prompt)
    assert old.hash_of(ROOT_HASH, prompt[:4], "") != new.hash_of(ROOT_HASH, prompt[:4], "")
    # Even holding the old version's entries verbatim, the new version's chain never reaches them.
    parent_hash = ROOT_HASH
    for block_id, start in ((1, 0), (2, 4)):
        parent_hash = old.hash_of(parent_hash, prompt[start:start + 4], "")
        new.insert(parent_hash, block_id, prompt[start:start + 4], "")
    assert new.match(prompt, "") == []
    assert old.match(prompt, "") == [1, 2]


def test_first_mapping_wins() -> None:
    index = make_index()
    block_hash = index.hash_of(ROOT_HASH, [1, 2, 3, 4], "")
    assert index.insert(block_hash, 7, [1, 2, 3, 4], "")
    assert not index.insert(block_hash, 8, [1, 2, 3, 4], "")
    assert index.match([1, 2, 3, 4], "") == [7]


def test_remove_only_unmaps_the_named_block() -> None:
    index = make_index()
    [block_id] = index_prompt(index, [1, 2, 3, 4])
    block_hash = index.hash_of(ROOT_HASH, [1, 2, 3, 4], "")
    index.remove(block_hash, block_id + 1)  # a stale eviction of some other block
    assert index.match([1, 2, 3, 4], "") == [block_id]
    index.remove(block_hash, block_id)
    assert index.match([1, 2, 3, 4], "") == []
    index.remove(block_hash, block_id)  # already gone: harmless
    index_prompt(index, [1, 2, 3, 4])
    index.clear()
    assert len(index) == 0
