"""`response_format` in, an llguidance grammar out: the front door's half of constrained decoding.

Why here: the front door refuses a schema before any work, with a 400 / INVALID_ARGUMENT naming
`response_format` and the compiler's reason, so a bad schema never reaches a worker. The grammar
travels as llguidance's JSON grammar text (scheduler: opaque; worker: binds it to the vocabulary,
services/worker/grammar.py). Compiling and checking a schema takes well under a millisecond here
and needs no vocabulary (`LLMatcher.validate_grammar`).

Why llguidance (measured by bench/structured_output_libs.py, figures and verdict in
bench/results/structured_output_libs.json): its schema compile is under a millisecond (outlines-core
took up to 1.6 s per new schema, which would land on that request's first token), its mask had no
pathological case among the schemas measured (xgrammar's cost 2.5 ms a token on a string with
maxLength), its mean mask (65 us) is a fraction of a percent of a decode step here, and it is one
small wheel with no dependencies. It is not the cheapest per token: outlines-core after its compile,
and xgrammar on schemas without string bounds, were.

Output is compact JSON (no whitespace between tokens): a small model otherwise spends tokens, and
sometimes all of max_tokens, on runs of spaces and newlines that the grammar would allow.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from services.tokenizer.api_types import ResponseFormat
from shared.errors import InvalidArgument

TYPES = ("text", "json_object", "json_schema")
FIELD = "response_format"
_COMPACT = {"whitespace_flexible": False}


def from_openai(body: Any) -> ResponseFormat | None:
    """OpenAI's `response_format` object (HTTP) as a `ResponseFormat`; None for free text."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise InvalidArgument(f"{FIELD}: must be an object such as {{\"type\": \"json_object\"}}", field=FIELD)
    kind = body.get("type", "text")
    if kind not in TYPES:
        raise InvalidArgument(f"{FIELD}.type: must be one of {', '.join(TYPES)}, got {kind!r}", field=f"{FIELD}.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    spec = body.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise InvalidArgument(f"{FIELD}.json_schema.schema: type json_schema needs "
                              "{\"json_schema\": {\"name\": ..., \"schema\": {...}}}", field=f"{FIELD}.json_schema.schema")
    return ResponseFormat("json_schema", json.dumps(spec["schema"]))


def grammar_for(response_format: ResponseFormat | None) -> str:
    """The llguidance grammar for a response format ("" for free text); refuses what cannot compile."""
    if response_format is None or response_format.type == "text":
        if response_format is not None and response_format.json_schema:
            raise InvalidArgument(f"{FIELD}.json_schema: only allowed with type json_schema", field=FIELD)
        return ""
    if response_format.type not in TYPES:
        raise InvalidArgument(f"{FIELD}.type: must be one of {', '.join(TYPES)}, got {response_format.type!r}",
                              field=f"{FIELD}.type")
    if response_format.type == "json_object":
        schema: Any = {"type": "object"}
    else:
        try:
            schema = json.loads(response_format.json_schema)
        except ValueError as e:
            raise InvalidArgument(f"{FIELD}.json_schema: not JSON ({e})", field=f"{FIELD}.json_schema") from None
        if not isinstance(schema, dict):
            raise InvalidArgument(f"{FIELD}.json_schema: must be a JSON object (a schema), got {type(schema).__name__}",
                                  field=f"{FIELD}.json_schema")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT)
    except ValueError as e:
        raise InvalidArgument(f"{FIELD}.json_schema: {e}", field=f"{FIELD}.json_schema") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidArgument(f"{FIELD}.json_schema: the schema cannot be compiled: {error.strip()}",
                              field=f"{FIELD}.json_schema")
    return grammar
