"""Environment helpers: good values parse, bad ones fail naming the variable and the value."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, env_bool, env_float, env_int, env_list, env_str


def test_defaults_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SY_TEST", raising=False)
    assert env_str("SY_TEST", "a") == "a"
    assert env_int("SY_TEST", 3) == 3
    assert env_float("SY_TEST", 0.5) == 0.5
    assert env_bool("SY_TEST", True) is True
    assert env_list("SY_TEST", ["x"]) == ["x"]
    monkeypatch.setenv("SY_TEST", "  ")
    assert env_int("SY_TEST", 7) == 7


def test_good_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SY_STR", " models/tiny-llama ")
    monkeypatch.setenv("SY_INT", "50061")
    monkeypatch.setenv("SY_FLOAT", "2.5")
    monkeypatch.setenv("SY_BOOL", "Yes")
    monkeypatch.setenv("SY_LIST", "127.0.0.1:50061, 127.0.0.1:50062,,")
    assert env_str("SY_STR", "") == "models/tiny-llama"
    assert env_int("SY_INT", 0, min_value=0) == 50061
    assert env_float("SY_FLOAT", 0.0, min_value=0.0) == 2.5
    assert env_bool("SY_BOOL", False) is True
    assert env_list("SY_LIST", []) == ["127.0.0.1:50061", "127.0.0.1:50062"]
    assert env_bool("SY_OFF", True, environ={"SY_OFF": "off"}) is False


@pytest.mark.parametrize(
    ("read", "raw", "expected"),
    [
        (lambda: env_int("SY_BAD", 1), "two", r"SY_BAD must be an integer, got 'two'"),
        (lambda: env_int("SY_BAD", 1, min_value=1), "0", r"SY_BAD must be >= 1, got '0'"),
        (lambda: env_int("SY_BAD", 1, max_value=8), "9", r"SY_BAD must be <= 8, got '9'"),
        (lambda: env_float("SY_BAD", 1.0), "fast", r"SY_BAD must be a number, got 'fast'"),
        (lambda: env_float("SY_BAD", 1.0), "nan", r"SY_BAD must be a finite number, got 'nan'"),
        (lambda: env_float("SY_BAD", 1.0, min_value=0.0), "-1", r"SY_BAD must be >= 0.0, got '-1'"),
        (lambda: env_bool("SY_BAD", False), "maybe", r"SY_BAD must be one of .*, got 'maybe'"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, read, raw: str, expected: str  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("SY_BAD", raw)
    with pytest.raises(ConfigError, match=expected):
        read()


def test_missing_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SY_REQUIRED", raising=False)
    with pytest.raises(ConfigError, match="SY_REQUIRED is not set"):
        env_str("SY_REQUIRED")
    assert issubclass(ConfigError, ValueError)
