"""API keys: the file format, Bearer parsing, names not secrets, and the gate with rate limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.auth import ApiKeys, Gate
from shared.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from shared.rate_limit import RateLimiter

SECRET_A = "sk-alice-0123456789"
SECRET_B = "sk-bob-9876543210"


def key_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keys"
    path.write_text(text)
    return str(path)


def test_file_with_names_comments_and_bare_secrets(tmp_path: Path) -> None:
    keys = ApiKeys.from_file(key_file(tmp_path, f"# team keys\nalice: {SECRET_A}\n\n{SECRET_B}\n"))
    assert len(keys) == 2
    assert keys.identify(f"Bearer {SECRET_A}") == "alice"
    assert keys.identify(f"bearer {SECRET_B}") == "key-4"  # named after its line


@pytest.mark.parametrize("value", [None, "", SECRET_A, f"Basic {SECRET_A}", f"Bearer {SECRET_A}x",
                                   f"Bearer {SECRET_A[:-1]}", "Bearer ", "Bearer sk-nobody-000000"])
def test_anything_but_a_configured_bearer_key_is_refused(tmp_path: Path, value: str | None) -> None:
    keys = ApiKeys.from_file(key_file(tmp_path, f"alice:{SECRET_A}\n"))
    with pytest.raises(Unauthenticated) as e:
        keys.identify(value)
    assert e.value.field == "authorization"
    assert SECRET_A not in e.value.message  # the error never echoes a secret


@pytest.mark.parametrize("text", ["", "# only a comment\n", "alice:short\n", "alice:has space inside\n",
                                  f"a:{SECRET_A}\nb:{SECRET_A}\n", f":{SECRET_A}\n"])
def test_bad_key_files_name_the_field(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        ApiKeys.from_file(key_file(tmp_path, text))
    assert e.value.field == "api_keys_file"


def test_missing_key_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as e:
        ApiKeys.from_file(str(tmp_path / "absent"))
    assert e.value.field == "api_keys_file"


def test_gate_limits_each_key_separately_with_a_retry_hint(tmp_path: Path) -> None:
    now = [0.0]
    gate = Gate(ApiKeys.from_file(key_file(tmp_path, f"alice:{SECRET_A}\nbob:{SECRET_B}\n")),
                RateLimiter(rate_per_s=4.0, burst=2), clock=lambda: now[0])
    assert gate.admit(f"Bearer {SECRET_A}") == "alice"
    assert gate.admit(f"Bearer {SECRET_A}") == "alice"
    with pytest.raises(ResourceExhausted) as e:
        gate.admit(f"Bearer {SECRET_A}")
    assert e.value.retry_after_s == pytest.approx(0.25)
    assert "alice" in e.value.message and SECRET_A not in e.value.message
    assert gate.admit(f"Bearer {SECRET_B}") == "bob"  # bob's bucket is full
    now[0] = 0.25
    assert gate.admit(f"Bearer {SECRET_A}") == "alice"


def test_gate_checks_the_key_before_spending_the_bucket(tmp_path: Path) -> None:
    gate = Gate(ApiKeys.from_file(key_file(tmp_path, f"alice:{SECRET_A}\n")), RateLimiter(1.0, 1), clock=lambda: 0.0)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            gate.admit("Bearer wrong-key-123")
    assert gate.admit(f"Bearer {SECRET_A}") == "alice"


def test_a_gate_without_keys_admits_everyone_and_can_still_limit() -> None:
    assert not Gate().enabled and Gate().admit(None) == ""
    gate = Gate(rate_limiter=RateLimiter(1.0, 1), clock=lambda: 0.0)
    gate.admit(None)
    with pytest.raises(ResourceExhausted):
        gate.admit(None)
