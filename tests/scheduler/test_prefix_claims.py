"""Prefix claims: a key stays claimed while any request holds it; a request lets go of all its keys at once."""

from __future__ import annotations

from services.scheduler.prefix_claims import PrefixClaims


def test_a_key_is_claimed_until_its_last_holder_releases_it() -> None:
    claims = PrefixClaims()
    assert not claims and claims.prefix_length([b"a"]) == 0
    claims.claim("r1", [b"a", b"b"])
    claims.claim("r2", [b"a", b"c"])
    assert claims.holds("r1") and b"a" in claims and claims.prefix_length([b"a", b"b", b"c"]) == 3
    claims.release("r1")
    assert not claims.holds("r1") and b"a" in claims and b"b" not in claims
    assert claims.prefix_length([b"a", b"b", b"c"]) == 1
    claims.release("r1")  # twice is nothing
    claims.release("r2")
    assert not claims and b"a" not in claims


def test_clear_forgets_every_claim() -> None:
    claims = PrefixClaims()
    claims.claim("r", [b"x"])
    claims.clear()
    assert not claims and not claims.holds("r")
