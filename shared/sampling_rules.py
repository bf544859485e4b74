"""The sampling-field rules both the front door and the scheduler enforce, and the two shapes
sampling takes: `SamplingFields` as a client sent them, `SamplingParams` resolved for a worker.

Each service validates on its own (the scheduler has callers other than the front door), but the
rules and their messages are one set, so a client hears the same refusal from either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidArgument

MAX_NUM_LOGPROBS = 20
# OpenAI's range for logit_bias values: -100 bans a token in practice, +100 all but forces it.
MAX_ABS_LOGIT_BIAS = 100.0
# Most sequences one request may ask for (`n`): each is a full request in the scheduler's batch.
MAX_N = 16
# Below this a temperature counts as greedy: dividing logits by it can overflow float32 to inf.
GREEDY_TEMPERATURE = 1e-5
# The optional scalars of the public SamplingParams, in proto order (unset on the wire is None here).
SCALAR_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "ignore_eos", "logprobs", "n")
# What the wire's fixed-width fields hold (SamplingParams.top_k is int32, seed int64); JSON has no
# such limits, so a larger value must be refused here rather than fail while building the message.
INT32_MAX = (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class SamplingFields:
    """The public SamplingParams as a client sent them; None means unset (OpenAI defaults apply
    downstream). The front door uses every field; the scheduler leaves `stop` (strings) empty."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool | None = None
    logprobs: int | None = None
    # (token id, bias) pairs sorted by id: a tuple rather than a dict keeps the dataclass hashable
    # and gives equal requests equal response-cache keys whatever order the client wrote them in.
    logit_bias: tuple[tuple[int, float], ...] = ()
    n: int | None = None  # sequences to generate; the front door fans them out, the scheduler runs one


def logit_bias_pairs(bias: dict[int, float] | Any) -> tuple[tuple[int, float], ...]:
    """A {token id: bias} mapping (a dict or a protobuf map) as the sorted pairs both dataclasses hold."""
    return tuple(sorted((int(k), float(v)) for k, v in bias.items()))


def check_logit_bias(bias: tuple[tuple[int, float], ...], vocab_size: int,
                     field: str = "sampling.logit_bias") -> None:
    """Every id in the vocabulary, every bias finite and within [-100, 100]."""
    bad_ids = [t for t, _ in bias if not 0 <= t < vocab_size]
    require(not bad_ids, field, f"token ids must be in [0, {vocab_size}), got {bad_ids[:5]}")
    bad = [(t, b) for t, b in bias if not (math.isfinite(b) and abs(b) <= MAX_ABS_LOGIT_BIAS)]
    require(not bad, field, f"biases must be in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}], "
            f"got {', '.join(f'{b} for token {t}' for t, b in bad[:5])}")


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidArgument(message, field=field)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def check_sampling_scalars(s: Any) -> None:
    """Checks the public SamplingParams scalars of `s` (None means unset) and `stop_token_ids`
    against nothing but their own ranges; vocabulary and length checks stay with the caller."""
    require(s.max_tokens is None or s.max_tokens >= 1, "sampling.max_tokens", f"must be >= 1, got {s.max_tokens}")
    # An int32 on the wire; bounding it here also keeps `prompt + max_tokens` (length checks) small.
    require(s.max_tokens is None or s.max_tokens <= INT32_MAX, "sampling.max_tokens",
            f"must be <= {INT32_MAX}, got {s.max_tokens}")
    require(_finite(s.temperature) and (s.temperature is None or s.temperature >= 0),
            "sampling.temperature", f"must be a finite number >= 0, got {s.temperature}")
    require(s.top_k is None or s.top_k >= 0, "sampling.top_k", f"must be >= 0 (0 disables), got {s.top_k}")
    require(s.top_k is None or s.top_k <= INT32_MAX, "sampling.top_k", f"must be <= {INT32_MAX}, got {s.top_k}")
    require(_finite(s.top_p) and (s.top_p is None or 0 < s.top_p <= 1),
            "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    require(_finite(s.min_p) and (s.min_p is None or 0 <= s.min_p <= 1),
            "sampling.min_p", f"must be in [0, 1], got {s.min_p}")
    require(_finite(s.repetition_penalty) and (s.repetition_penalty is None or s.repetition_penalty > 0),
            "sampling.repetition_penalty", f"must be > 0, got {s.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        require(_finite(value) and (value is None or -2 <= value <= 2),
                f"sampling.{name}", f"must be in [-2, 2], got {value}")
    require(s.seed is None or INT64_MIN <= s.seed <= INT64_MAX,
            "sampling.seed", f"must be a 64-bit signed integer, in [{INT64_MIN}, {INT64_MAX}], got {s.seed}")
    require(s.logprobs is None or 0 <= s.logprobs <= MAX_NUM_LOGPROBS,
            "sampling.logprobs", f"must be in [0, {MAX_NUM_LOGPROBS}], got {s.logprobs}")
    require(s.n is None or 1 <= s.n <= MAX_N, "sampling.n", f"must be in [1, {MAX_N}], got {s.n}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens, resolved to concrete values: what the scheduler sends a
    worker and the worker's sampler reads (one shape on both sides of the Step contract); defaults
    are the OpenAI ones (plain sampling)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off; over prompt + output tokens (HF/vLLM semantics)
    presence_penalty: float = 0.0  # over output tokens (OpenAI semantics)
    frequency_penalty: float = 0.0  # over output tokens, per occurrence (OpenAI semantics)
    seed: int | None = None
    return_logprobs: bool = False
    num_logprobs: int = 0  # top-n alternatives returned with each token
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) sorted by id; added before penalties

    def __post_init__(self) -> None:
        # Only what would break the math; the scheduler owns user-facing validation.
        checks = (
            ("temperature", "a finite number >= 0",
             math.isfinite(self.temperature) and self.temperature >= 0),
            ("top_k", "an integer >= 0", self.top_k >= 0),
            ("top_p", "in (0, 1]", 0 < self.top_p <= 1),
            ("min_p", "in [0, 1]", 0 <= self.min_p <= 1),
            ("repetition_penalty", "a finite number > 0",
             math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0),
            ("presence_penalty", "finite", math.isfinite(self.presence_penalty)),
            ("frequency_penalty", "finite", math.isfinite(self.frequency_penalty)),
            ("num_logprobs", f"in [0, {MAX_NUM_LOGPROBS}]", 0 <= self.num_logprobs <= MAX_NUM_LOGPROBS),
            # Ids are checked against the vocabulary by the sampler, which knows it; a non-finite
            # bias would turn a row's logits into NaN.
            ("logit_bias", "finite biases", all(math.isfinite(b) for _, b in self.logit_bias)),
        )
        for name, rule, ok in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
