"""Structured output on the real model (SmolLM2-135M-Instruct): for 32 schemas (nested objects,
arrays with bounds, enums, numbers and integers with bounds, required and optional fields, anyOf,
$ref) and three samplings each (greedy and two seeds), every answer parses and validates with
`jsonschema`; and the official `openai` client gets valid JSON from chat (streaming and not) and
from completions. The stack is in-process (real gRPC servers on loopback, one worker)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from switchyard.api.v1 import generation_pb2 as pb

from tests.inprocess import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SHORT = {"type": "string", "maxLength": 16}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
# A JSON number may have any number of digits, and a small model sampling at temperature 1 may
# never stop drawing them (the grammar allows it): decimals are bounded with multipleOf, as the
# README advises, the way strings and arrays are bounded with maxLength and maxItems.
PRICE = {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01}
COLOR = {"enum": ["red", "green", "blue"]}


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


# (what to ask for, schema)
SCHEMAS: list[tuple[str, dict]] = [
    ("a person", obj({"name": NAME, "age": AGE})),
    ("a person with an optional email", obj({"name": NAME, "email": SHORT}, ["name"])),
    ("a product", obj({"title": NAME, "price": PRICE, "in_stock": {"type": "boolean"}})),
    ("a colour choice", obj({"color": COLOR})),
    ("a temperature reading", obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60, "multipleOf": 0.1}})),
    ("a score out of ten", obj({"score": {"type": "integer", "minimum": 1, "maximum": 10}})),
    ("a list of fruits", obj({"fruits": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 4}})),
    ("three numbers", obj({"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "minItems": 3, "maxItems": 3}})),
    ("a city with its country", obj({"city": NAME, "country": NAME})),
    ("an address", obj({"address": obj({"street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("a book", obj({"title": NAME, "author": obj({"first": SHORT, "last": SHORT}), "year": {"type": "integer", "minimum": 1400, "maximum": 2030}})),
    ("a to-do list", obj({"items": {"type": "array", "maxItems": 3,
                                    "items": obj({"task": NAME, "done": {"type": "boolean"}})}})),
    ("a traffic light state", obj({"light": {"enum": ["red", "amber", "green"]}, "seconds_left": {"type": "integer", "minimum": 0, "maximum": 90}})),
    ("a yes or no answer", obj({"answer": {"enum": ["yes", "no"]}})),
    ("a movie rating", obj({"movie": NAME, "stars": {"type": "number", "minimum": 0, "maximum": 5, "multipleOf": 0.5}})),
    ("a pet", obj({"species": {"enum": ["cat", "dog", "fish", "bird"]}, "name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 30}})),
    ("a point in 2D", obj({"x": {"type": "number", "minimum": -100, "maximum": 100, "multipleOf": 0.25},
                           "y": {"type": "number", "minimum": -100, "maximum": 100, "multipleOf": 0.25}})),
    ("a team of people", obj({"team": SHORT, "members": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj({"name": NAME, "age": AGE})}})),
    ("an event", obj({"event": NAME, "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}, "hour": {"type": "integer", "minimum": 0, "maximum": 23}})),
    ("a recipe", obj({"dish": NAME, "ingredients": {"type": "array", "items": SHORT, "minItems": 2, "maxItems": 4},
                      "minutes": {"type": "integer", "minimum": 1, "maximum": 240}})),
    ("a boolean flag", obj({"enabled": {"type": "boolean"}})),
    ("a nullable note", obj({"note": {"anyOf": [SHORT, {"type": "null"}]}})),
    ("a shape", {"anyOf": [obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.1}}),
                           obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.1}})]}),
    ("a version", obj({"major": {"type": "integer", "minimum": 0, "maximum": 9}, "minor": {"type": "integer", "minimum": 0, "maximum": 99}})),
    ("a country code", obj({"code": {"type": "string", "pattern": "^[A-Z]{2}$"}})),
    ("a weather report", obj({"city": NAME, "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]},
                              "wind_kmh": {"type": "integer", "minimum": 0, "maximum": 200}})),
    ("a user profile", obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99999}, "name": NAME}),
                            "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]}, "minItems": 1, "maxItems": 3}})),
    ("an order", obj({"order_id": {"type": "integer", "minimum": 1, "maximum": 9999},
                      "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": obj({"sku": SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}})),
    ("a percentage", obj({"percent": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.01}})),
    ("a word and its length", obj({"word": SHORT, "length": {"type": "integer", "minimum": 0, "maximum": 16}})),
    ("a tree of two levels", {"$defs": {"leaf": obj({"label": SHORT})},
                              **obj({"root": SHORT, "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/leaf"}}})}),
    ("a greeting", obj({"greeting": NAME, "language": {"enum": ["en", "fr", "de", "es"]}})),
]
SAMPLINGS = [dict(temperature=0.0), dict(temperature=0.7, seed=1), dict(temperature=1.0, top_p=0.9, seed=2)]
# Room for strings in scripts of several tokens a character, which sampled answers sometimes take.
MAX_TOKENS = 320


@pytest.fixture(scope="module")
async def stack(smollm2_model_dir):
    async with Stack(smollm2_model_dir, front_door=True, num_workers=1, num_blocks=2048) as running:
        yield running


async def generate(stack, what: str, schema: dict, sampling: dict) -> tuple[str, int]:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=f"Describe {what} as a JSON object.")])
    req = pb.GenerateRequest(messages=messages, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, **sampling),
                             response_format=pb.ResponseFormat(type="json_schema", json_schema=json.dumps(schema)))
    responses = [r async for r in stack.api.Generate(req, timeout=300)]
    return "".join(r.text for r in responses), responses[-1].finish_reason


async def test_every_schema_and_sampling_gives_valid_json(stack) -> None:
    assert len(SCHEMAS) >= 30
    cases = [(what, schema, sampling) for what, schema in SCHEMAS for sampling in SAMPLINGS]
    results = await asyncio.gather(*(generate(stack, *case) for case in cases))
    failures = []
    for (what, schema, sampling), (text, finish) in zip(cases, results):
        try:
            assert finish == pb.FINISH_REASON_STOP, f"finish {pb.FinishReason.Name(finish)}"
            jsonschema.validate(json.loads(text), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{what} {sampling}: {str(e)[:120]} <- {text[:200]!r}")
    assert not failures, "\n".join(failures)


async def test_openai_client_chat_and_completions(stack, client: openai.AsyncOpenAI) -> None:
    what, schema = SCHEMAS[0]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": f"Describe {what} as a JSON object."}]
    reply = await client.chat.completions.create(model=stack.frontend.model_name, messages=messages, temperature=0,
                                                 max_tokens=MAX_TOKENS, response_format=response_format)
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    stream = await client.chat.completions.create(model=stack.frontend.model_name, messages=messages, temperature=0.8,
                                                  seed=4, max_tokens=MAX_TOKENS, response_format=response_format,
                                                  stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    jsonschema.validate(json.loads(text), schema)
    completion = await client.completions.create(model=stack.frontend.model_name, prompt="A JSON object about cats:",
                                                 max_tokens=MAX_TOKENS, temperature=0,
                                                 extra_body={"response_format": {"type": "json_object"}})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].text), dict)
