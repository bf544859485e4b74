"""Typed reads of environment variables for each service's `config.py`.

A misconfigured service should fail at startup with a message that names the variable and the
value it got, not later with a bare `ValueError: invalid literal for int()`. An empty value counts
as unset, so `FOO=` in a compose file or shell falls back to the default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def _raw(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _required(name: str) -> ConfigError:
    return ConfigError(f"{name} is not set and has no default")


def _check_range(
    name: str, value: float, min_value: float | None, max_value: float | None, raw: str
) -> None:
    if min_value is not None and value < min_value:
        raise ConfigError(f"{name} must be >= {min_value}, got {raw!r}")
    if max_value is not None and value > max_value:
        raise ConfigError(f"{name} must be <= {max_value}, got {raw!r}")


def env_str(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None) -> str:
    """The variable's value (stripped), or `default`; no default means the variable is required."""
    raw = _raw(name, environ)
    if raw is not None:
        return raw
    if default is None:
        raise _required(name)
    return default


def env_int(
    name: str,
    default: int | None = None,
    min_value: int | None = None,
    max_value: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> int:
    raw = _raw(name, environ)
    if raw is None:
        if default is None:
            raise _required(name)
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    _check_range(name, value, min_value, max_value, raw)
    return value


def env_float(
    name: str,
    default: float | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> float:
    raw = _raw(name, environ)
    if raw is None:
        if default is None:
            raise _required(name)
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    # "nan" and "inf" parse as floats but are never a sane timeout, weight or ratio.
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    _check_range(name, value, min_value, max_value, raw)
    return value


def env_bool(name: str, default: bool | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Accepts 1/0, true/false, yes/no, on/off in any case."""
    raw = _raw(name, environ)
    if raw is None:
        if default is None:
            raise _required(name)
        return default
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be one of 1/0, true/false, yes/no, on/off, got {raw!r}")


def env_list(
    name: str, default: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Comma-separated items, each stripped; empty items (as in "a,,b" or a trailing comma) dropped."""
    raw = _raw(name, environ)
    if raw is None:
        if default is None:
            raise _required(name)
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]
