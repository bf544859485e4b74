"""response_format at the front door: the OpenAI shapes it takes, the refusals (each naming the
field, over HTTP with the official client and over gRPC), and the response cache keeping
constrained and free answers apart. Validity of constrained output on the real model is
tests/e2e/test_structured_output.py's."""

from __future__ import annotations

import json

import grpc
import openai
import pytest
from switchyard.api.v1 import generation_pb2 as pb

from services.tokenizer.api_types import ResponseFormat
from services.tokenizer.response_cache import cache_key
from services.tokenizer.structured_output import from_openai, grammar_for
from shared.errors import InvalidArgument
from shared.sampling_rules import SamplingFields

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_openai_shapes() -> None:
    assert from_openai(None) is None and from_openai({"type": "text"}) is None
    assert from_openai({"type": "json_object"}) == ResponseFormat("json_object")
    rf = from_openai({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    assert rf.type == "json_schema" and json.loads(rf.json_schema) == SCHEMA
    assert grammar_for(None) == "" and grammar_for(ResponseFormat("text")) == ""
    assert "json_schema" in grammar_for(rf) and grammar_for(rf) != grammar_for(ResponseFormat("json_object"))


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"type": "xml"}, "response_format.type", "must be one of"),
    ({"type": "json_schema"}, "response_format.json_schema.schema", "needs"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}, "response_format.json_schema.schema", "needs"),
    ("json", "response_format", "must be an object"),
])
def test_openai_shape_refusals(body, field, words) -> None:
    with pytest.raises(InvalidArgument) as e:
        from_openai(body)
    assert e.value.field == field and words in e.value.message


@pytest.mark.parametrize(("rf", "words"), [
    (ResponseFormat("json_schema", "{not json"), "not JSON"),
    (ResponseFormat("json_schema", "[1, 2]"), "must be a JSON object"),
    (ResponseFormat("json_schema", json.dumps({"type": "objectx"})), "Invalid type"),
    (ResponseFormat("json_schema", json.dumps({"type": "integer", "minimum": 5, "maximum": 1})), "Unsatisfiable"),
    (ResponseFormat("json_schema", json.dumps({"type": "string", "pattern": "(("})), "regex"),
    (ResponseFormat("json_schema", json.dumps({"$ref": "#/defs/missing"})), "does not exist"),
    (ResponseFormat("yaml"), "must be one of"),
    (ResponseFormat("text", "{}"), "only allowed with type json_schema"),
])
def test_schemas_that_cannot_compile_are_refused_with_the_reason(rf, words) -> None:
    with pytest.raises(InvalidArgument) as e:
        grammar_for(rf)
    assert e.value.field.startswith("response_format") and words in e.value.message, e.value.message


def test_the_cache_key_tells_constrained_from_free() -> None:
    sampling = SamplingFields(max_tokens=8, temperature=0.0)
    free = cache_key("", "", [1, 2, 3], sampling)
    assert free == cache_key("", "", [1, 2, 3], sampling, "")
    json_object = cache_key("", "", [1, 2, 3], sampling, grammar_for(ResponseFormat("json_object")))
    schema = cache_key("", "", [1, 2, 3], sampling, grammar_for(ResponseFormat("json_schema", json.dumps(SCHEMA))))
    assert len({free, json_object, schema}) == 3


on_session_loop = pytest.mark.asyncio(loop_scope="session")


@on_session_loop
async def test_http_refusals_name_the_parameter(client: openai.AsyncOpenAI) -> None:
    bad = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
         "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "bogus"}, "response_format.type"),
    ]
    for response_format, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                                 response_format=response_format, max_tokens=4)
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model="tiny-llama", prompt="hi", max_tokens=4,
                                            extra_body={"response_format": response_format})
        assert e.value.body["param"] == param


@on_session_loop
async def test_grpc_refusal_is_invalid_argument_naming_the_field(stack) -> None:
    req = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=4),
                             response_format=pb.ResponseFormat(type="json_schema", json_schema='{"type": 7}'))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in stack.api.Generate(req, timeout=60):
            pass
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("response_format.json_schema:"), e.value.details()


@on_session_loop
async def test_tiny_model_output_is_a_json_object_over_both_doors(stack, client: openai.AsyncOpenAI) -> None:
    """The tiny model's weights are random: only the mask makes its output JSON."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    reply = await client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "a number"}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop"
    assert 0 <= json.loads(reply.choices[0].message.content)["n"] <= 9
    req = pb.GenerateRequest(prompt="a number", sampling=pb.SamplingParams(max_tokens=40, temperature=0.5, seed=3),
                             response_format=pb.ResponseFormat(type="json_schema", json_schema=json.dumps(schema)))
    text = "".join([r.text async for r in stack.api.Generate(req, timeout=60)])
    assert 0 <= json.loads(text)["n"] <= 9
