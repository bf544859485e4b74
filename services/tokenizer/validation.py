"""Checks a generation request before any work is done; every refusal names the field.

The same rules apply to the gRPC and the HTTP API (both build a `GenerateInput`), so a client
gets the same message whichever door it used.
"""

from __future__ import annotations


from services.tokenizer.api_types import GenerateInput, SamplingInput
from shared.errors import InvalidArgument
from shared.sampling_rules import INT32_MAX, check_logit_bias, check_sampling_scalars, require

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _require_text(value: str, field: str) -> None:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 encoder, tokenizer or protobuf takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"must be valid Unicode text, got a lone surrogate at character {e.start}",
                              field=field) from None


def validate_sampling(s: SamplingInput) -> None:
    check_sampling_scalars(s)
    require(len(s.stop) <= MAX_STOP_STRINGS, "sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for stop in s.stop:
        _require_text(stop, "sampling.stop")
        require(0 < len(stop) <= MAX_STOP_STRING_CHARS, "sampling.stop",
                 f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} characters, got {len(stop)}")


def validate_input(inp: GenerateInput, vocab_size: int, has_chat_template: bool) -> None:
    """Field checks that need no tokenization."""
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(inp, name) is not None]
    require(len(given) == 1, "prompt",
             f"give exactly one of prompt, messages or prompt_token_ids (got {', '.join(given) or 'none'})")
    for name in ("request_id", "session_id", "cache_salt"):
        _require_text(getattr(inp, name), name)
    require(-INT32_MAX - 1 <= inp.priority <= INT32_MAX, "priority",
             f"must be a 32-bit signed integer, got {inp.priority}")
    if inp.prompt is not None:
        require(inp.prompt != "", "prompt", "must not be empty")
        _require_text(inp.prompt, "prompt")
    if inp.messages is not None:
        require(len(inp.messages) > 0, "messages", "must not be empty")
        require(has_chat_template, "messages", "the model has no chat template; send a prompt instead")
        for i, message in enumerate(inp.messages):
            require(message.role in CHAT_ROLES, f"messages[{i}].role",
                     f"must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}")
            _require_text(message.content, f"messages[{i}].content")
            for j, call in enumerate(message.tool_calls):
                _require_text(call.name + call.arguments + call.id, f"messages[{i}].tool_calls[{j}].function")
    if inp.prompt_token_ids is not None:
        require(len(inp.prompt_token_ids) > 0, "prompt_token_ids", "must not be empty")
        bad = [t for t in inp.prompt_token_ids if not 0 <= t < vocab_size]
        require(not bad, "prompt_token_ids", f"ids must be in [0, {vocab_size}), got {bad[:5]}")
    bad_stop_ids = [t for t in inp.sampling.stop_token_ids if not 0 <= t < vocab_size]
    require(not bad_stop_ids, "sampling.stop_token_ids", f"ids must be in [0, {vocab_size}), got {bad_stop_ids[:5]}")
    check_logit_bias(inp.sampling.logit_bias, vocab_size)
    require(inp.timeout_s is None or inp.timeout_s > 0, "deadline", "already passed")
    validate_sampling(inp.sampling)


def validate_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    total = num_prompt_tokens + max_tokens
    require(total <= max_model_len, "sampling.max_tokens",
             f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's "
             f"maximum length of {max_model_len} tokens")
