"""Property-based fuzzing of the front door against the running stack (issue 7, "Bad input").

Hypothesis generates ~5,000 gRPC `GenerateRequest`s and ~5,000 HTTP bodies for /v1/completions and
/v1/chat/completions, valid and invalid, and sends them to a real stack (workers, scheduler and
tokenizer as separate processes, started the way `make up` starts them), a batch at a time, the
batch concurrently.

Each generated case is a valid request plus zero or more mutations. A mutation either breaks one
field (the case then records the field the refusal must name) or moves a field to an extreme that
is still valid (int64 seeds, top_k = 2^31 - 1, 16 stop strings of 256 characters, denormal or
huge temperatures, weird Unicode...). Some requests in a batch share a request id while in flight.
gRPC adds bytes protobuf's serializer never writes (a string field that is not UTF-8, such as an
encoded lone surrogate; corrupt or truncated wire format), sent through a raw-bytes stub. HTTP adds
lone surrogates as JSON escapes and whole-body chaos: bytes that are not JSON, JSON that is not an
object, nesting deeper than the parser's stack, 5,000-digit integers, invalid UTF-8, a body over
the size cap, wrong or missing content types, wrong methods and paths.

Every call must end within `CALL_TIMEOUT_S` (a timeout is a hung stream) with:
- gRPC: OK (a stream whose last response has finish_reason STOP or LENGTH and consistent usage),
  INVALID_ARGUMENT naming a field the case broke, or RESOURCE_EXHAUSTED; never INTERNAL/UNKNOWN.
- HTTP: never 5xx; a 4xx is an OpenAI error body, and a 400 for a broken field names it (`param`
  or message); a 200 is a whole response with a finish_reason or an SSE stream ending in
  `data: [DONE]` (an error event before it must not be a server error).
Afterwards greedy answers through gRPC and HTTP still equal Hugging Face's, nothing is live in the
scheduler, no KV block is in use, every process of the stack is still running and none logged a
traceback. One line starting with `FIGURES:` gives the counts by status and the wall time.

Reproducible: `derandomize=True`, no example database. Shrinking is off by default (each shrink
step replays a batch against the stack, and a hung case costs `CALL_TIMEOUT_S` per replay; the
failure message already names the offending request); set SWITCHYARD_FUZZ_SHRINK=1 to turn it on.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from deploy.stack import start_stack, stop_stack
from tests.deploy.test_stack import make_config
from tests.reference import assert_greedy_matches, hf_greedy

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

NUM_GRPC = 5000
NUM_HTTP = 5000
BATCH = 16  # cases per Hypothesis example, sent concurrently
CALL_TIMEOUT_S = 30.0  # a call still running after this is a hung stream
VOCAB = 4096  # the tiny model's
MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 1 << 20  # the front door's default cap on one request (gRPC message or HTTP body)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)
NAN, INF = math.nan, math.inf
F32_MAX = 3.4028234663852886e38
F32_DENORMAL_MIN = 1.401298464324817e-45
HEAVY_EVERY = 250  # about one case in this many carries a prompt near (or over) the byte cap

SHRINK = os.environ.get("SWITCHYARD_FUZZ_SHRINK") == "1"
# Record failures and go on to the end of the run instead of stopping at the first failing batch
# (to list every bug at once); the test still fails at the end.
KEEP_GOING = os.environ.get("SWITCHYARD_FUZZ_KEEP_GOING") == "1"
FUZZ_SETTINGS = dict(
    deadline=None, database=None, derandomize=True, print_blob=False,
    phases=(Phase.explicit, Phase.generate, *((Phase.shrink,) if SHRINK else ())),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)

# --- figures ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    started_s: float = field(default_factory=time.monotonic)
    sent: Counter = field(default_factory=Counter)  # door -> requests sent
    outcomes: Counter = field(default_factory=Counter)  # (door, status) -> count
    heavy: Counter = field(default_factory=Counter)  # door -> prompts near/over the byte cap
    failures: Counter = field(default_factory=Counter)  # hung / internal / http_5xx / other
    failed: list[str] = field(default_factory=list)  # descriptions, with KEEP_GOING
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, door: str, status: str | int) -> None:
        with self.lock:
            self.sent[door] += 1
            self.outcomes[door, str(status)] += 1

    def line(self) -> str:
        def by_status(door: str) -> str:
            return ", ".join(f"{s}={n}" for (d, s), n in sorted(self.outcomes.items()) if d == door)

        total = sum(self.sent.values())
        return (f"FIGURES: fuzz requests={total} grpc={self.sent['grpc']} ({by_status('grpc')}) "
                f"http={self.sent['http']} ({by_status('http')}) near-cap prompts grpc={self.heavy['grpc']} "
                f"http={self.heavy['http']} hung={self.failures['hung']} internal={self.failures['internal']} "
                f"http_5xx={self.failures['http_5xx']} other_failures={self.failures['other']} "
                f"wall={time.monotonic() - self.started_s:.0f}s")


# --- the stack ---------------------------------------------------------------------------------------


@dataclass
class Clients:
    stack: Any
    api: generation_pb2_grpc.GenerationStub
    generate_wire: Callable[..., Iterator[pb.GenerateResponse]]  # Generate taking serialized bytes
    scheduler: scheduler_pb2_grpc.SchedulerStub
    http: httpx.Client
    pool: ThreadPoolExecutor
    model: str
    batches: Iterator[int]
    tally: Tally


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    tally = Tally()
    yield tally
    print(f"\n{tally.line()}")  # at teardown, so the figures are there even when a test failed


@pytest.fixture(scope="module")
def clients(tiny_model_dir, tmp_path_factory, tally) -> Iterator[Clients]:
    config = make_config(tmp_path_factory.mktemp("run"), tiny_model_dir, services=("worker", "scheduler", "tokenizer"))
    stack = start_stack(config)
    try:
        with grpc.insecure_channel(stack.tokenizer_address) as api_channel, \
                grpc.insecure_channel(stack.scheduler_address) as sched_channel, \
                httpx.Client(base_url=stack.http_url, timeout=httpx.Timeout(CALL_TIMEOUT_S),
                             limits=httpx.Limits(max_connections=2 * BATCH)) as http, \
                ThreadPoolExecutor(max_workers=BATCH, thread_name_prefix="fuzz") as pool:
            api = generation_pb2_grpc.GenerationStub(api_channel)
            model = api.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert (model.vocab_size, model.max_model_len) == (VOCAB, MAX_MODEL_LEN), model
            generate_wire = api_channel.unary_stream(
                "/switchyard.api.v1.Generation/Generate", request_serializer=None,
                response_deserializer=pb.GenerateResponse.FromString)
            yield Clients(stack, api, generate_wire, scheduler_pb2_grpc.SchedulerStub(sched_channel), http, pool,
                          model.model, itertools.count(), tally)
    finally:
        stop_stack(config.run_dir, quiet=True)


# --- shared strategies -----------------------------------------------------------------------------

# Anything protobuf and UTF-8 can carry (no lone surrogates): controls, NUL, combining marks, RTL,
# private use, astral planes.
any_text = st.text(st.characters(codec="utf-8"), max_size=12)
word_text = st.text(st.sampled_from("abc xyz\n\t.,!?éü東京🚀\u200b\u202e\x00"), min_size=1, max_size=16)
prompt_text = st.one_of(word_text, st.text(st.characters(codec="utf-8"), min_size=1, max_size=16))
token_id = st.integers(0, VOCAB - 1)


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in n draws. (Hypothesis favours small and boundary integers, so a plain
    `integers(0, n - 1) == 0` comes out true far more often than that.)"""
    return st.integers(0, 1 << 30).map(lambda v: v % n == n // 2)


def spread(options: list[Any]) -> st.SearchStrategy[Any]:
    """Like sampled_from, without sampled_from's strong lean towards the first option."""
    return st.integers(0, 1 << 30).map(lambda v: options[v % len(options)])


heavy_gate = one_in(HEAVY_EVERY)


def _as_f32(x: float | None) -> float | None:
    return None if x is None else struct.unpack("f", struct.pack("f", x))[0]


def f32(lo: float | None = None, hi: float | None = None) -> st.SearchStrategy[float]:
    """Finite float32 values in [lo, hi] (bounds rounded to float32; the thresholds used keep their side)."""
    return st.floats(min_value=_as_f32(lo), max_value=_as_f32(hi), width=32, allow_nan=False, allow_infinity=False)


@dataclass(repr=False)
class Case:
    """One request and what the stack may answer to it."""

    door: str  # "grpc" or "http"
    label: str  # what the case is, for failure messages
    bad: set[str] = field(default_factory=set)  # fields it broke: a refusal must name one of them
    may_fail: bool = False  # a refusal is fine (duplicate request id), an answer too
    max_tokens: int | None = None  # the answer may not be longer
    heavy: bool = False
    # gRPC
    request: pb.GenerateRequest | None = None
    wire: bytes | None = None  # sent instead of `request` when set: bytes protobuf would not produce
    # HTTP
    method: str = "POST"
    path: str = "/v1/completions"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    raw: bool = False  # whole-body chaos: any 4xx is a fine refusal, named param or not
    json_body: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.wire is not None:
            what = f"wire bytes {self.wire[:600]!r}"
        elif self.request is not None:
            what = repr(self.request)
        else:
            what = f"{self.method} {self.path} headers={self.headers} body={self.body[:400]!r}"
            if len(self.body) > 400:
                what += f"... ({len(self.body)} bytes)"
        return f"[{self.door}] {self.label} bad={sorted(self.bad)} :: {what[:1500]}"

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying batch
        return self.describe()[:300]


def benign(mutation: Callable[..., None]) -> Callable[..., None]:
    """Marks a mutation that keeps a request valid; those are applied before the breaking ones, so
    that none of them can undo a broken field."""
    mutation.benign = True  # type: ignore[attr-defined]
    return mutation


def in_order(mutations: list[Callable[..., None]]) -> list[Callable[..., None]]:
    return sorted(mutations, key=lambda m: not getattr(m, "benign", False))


def named(fields: set[str], text: str | None) -> bool:
    return bool(text) and any(f in text for f in fields)


# --- gRPC cases ------------------------------------------------------------------------------------

# field -> values that break it; the refusal must name the field.
GRPC_BAD_SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.one_of(f32(hi=-1e-6), st.sampled_from([NAN, INF, -INF, -F32_MAX])),
    "top_p": st.one_of(f32(hi=0.0), f32(lo=1.0000001), st.sampled_from([NAN, INF, -INF])),
    "top_k": st.integers(INT32[0], -1),
    "min_p": st.one_of(f32(hi=-1e-6), f32(lo=1.0000001), st.sampled_from([NAN, INF])),
    "repetition_penalty": st.one_of(f32(hi=0.0), st.sampled_from([NAN, INF, -INF])),
    "presence_penalty": st.one_of(f32(hi=-2.0000002), f32(lo=2.0000002), st.sampled_from([NAN, INF, -INF])),
    "frequency_penalty": st.one_of(f32(hi=-2.0000002), f32(lo=2.0000002), st.sampled_from([NAN, INF, -INF])),
    "max_tokens": st.one_of(st.integers(INT32[0], 0), st.integers(MAX_MODEL_LEN, INT32[1])),
    "logprobs": st.one_of(st.integers(INT32[0], -1), st.integers(21, INT32[1])),
}
# Extreme but valid: the answer must be a normal stream.
GRPC_EDGE_SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.sampled_from([0.0, -0.0, F32_DENORMAL_MIN, 1e-6, 1e-5, 100.0, F32_MAX]),
    "top_p": st.sampled_from([F32_DENORMAL_MIN, 1e-6, 1.0]),
    "top_k": st.sampled_from([0, 1, VOCAB - 1, VOCAB, VOCAB + 1, INT32[1]]),
    "min_p": st.sampled_from([0.0, 1.0, F32_DENORMAL_MIN]),
    "repetition_penalty": st.sampled_from([F32_DENORMAL_MIN, 1e-30, 1.0, 1e30, F32_MAX]),
    "presence_penalty": st.sampled_from([-2.0, 2.0]),
    "frequency_penalty": st.sampled_from([-2.0, 2.0]),
    "seed": st.sampled_from([INT64[0], INT64[1], -1, 0, 1]),
    "logprobs": st.sampled_from([0, 20]),
}


@st.composite
def sampling_params(draw: st.DrawFn, max_tokens: int) -> pb.SamplingParams:
    s = pb.SamplingParams(max_tokens=max_tokens)
    if draw(st.booleans()):
        s.temperature = draw(st.one_of(st.just(0.0), f32(0.0, 2.0)))
    if draw(st.booleans()):
        s.top_p = draw(f32(0.01, 1.0))
    if draw(st.booleans()):
        s.top_k = draw(st.integers(0, 100))
    if draw(st.booleans()):
        s.min_p = draw(f32(0.0, 1.0))
    if draw(st.booleans()):
        s.repetition_penalty = draw(f32(0.5, 2.0))
        s.presence_penalty = draw(f32(-2.0, 2.0))
        s.frequency_penalty = draw(f32(-2.0, 2.0))
    if draw(st.booleans()):
        s.seed = draw(st.integers(*INT64))
    s.stop.extend(draw(st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6), max_size=3)))
    s.stop_token_ids.extend(draw(st.lists(token_id, max_size=3)))
    if draw(st.booleans()):
        s.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        s.logprobs = draw(st.integers(0, 20))
    return s


@st.composite
def grpc_case(draw: st.DrawFn) -> Case:
    case = Case("grpc", "")
    req = pb.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "messages", "prompt_token_ids"]))
    if kind == "prompt":
        req.prompt = draw(prompt_text)
    elif kind == "messages":
        for role, content in draw(st.lists(st.tuples(st.sampled_from(CHAT_ROLES), any_text), min_size=1, max_size=3)):
            req.messages.messages.add(role=role, content=content)
    else:
        req.prompt_token_ids.ids.extend(draw(st.lists(token_id, min_size=1, max_size=16)))
    case.max_tokens = draw(st.integers(1, 4))
    req.sampling.CopyFrom(draw(sampling_params(case.max_tokens)))
    req.session_id = draw(st.one_of(st.just(""), any_text))
    req.cache_salt = draw(st.one_of(st.just(""), any_text))
    req.priority = draw(st.one_of(st.just(0), st.integers(*INT32)))
    labels = [kind]

    for mutation in in_order(draw(st.lists(st.sampled_from(GRPC_MUTATIONS), max_size=2, unique=True))):
        labels.append(mutation.__name__.removeprefix("_g_"))
        mutation(draw, req, case)
    if draw(heavy_gate):  # a prompt near the byte cap, or over it
        size = draw(st.sampled_from([MAX_REQUEST_BYTES - 4096, MAX_REQUEST_BYTES + 1, 3 * MAX_REQUEST_BYTES // 2]))
        unit = draw(st.sampled_from(["a", "é", "東", "🚀", "hello world "]))
        req.prompt = (unit * (size // len(unit.encode()) + 1))[:size]
        case.bad |= {"request", "sampling.max_tokens"}  # over the byte cap, or over max_model_len tokens
        case.heavy = True
        labels.append(f"near-cap prompt of {size} bytes")
    case.label, case.request = "+".join(labels), req
    if draw(one_in(12)):
        corrupt_wire(draw, case)
    return case


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _string_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# Byte strings that are not UTF-8: a lone continuation byte, an encoded lone surrogate (CESU-8),
# an overlong '/', a code point above U+10FFFF, a cut-off sequence.
NOT_UTF8 = [b"\xff", b"a\x80b", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe6\x9d"]


def corrupt_wire(draw: st.DrawFn, case: Case) -> None:
    """Bytes for Generate that protobuf's own serializer never writes."""
    wire = case.request.SerializeToString()
    how = draw(spread(["not utf-8", "not utf-8", "garbage appended", "garbage", "truncated"]))
    if how == "not utf-8":
        # Appending a field to a message is valid protobuf (the last value wins, nested ones merge).
        payload = draw(st.sampled_from(NOT_UTF8))
        where = draw(spread(["request_id", "prompt", "session_id", "cache_salt", "sampling.stop",
                             "messages.content", "messages.role"]))
        number = {"request_id": 1, "prompt": 2, "session_id": 6, "cache_salt": 7}.get(where)
        if number is not None:
            extra = _string_field(number, payload)
        elif where == "sampling.stop":
            extra = _string_field(5, _string_field(10, payload))
        else:  # ChatMessages.messages(1) -> ChatMessage.role(1) / content(2)
            extra = _string_field(3, _string_field(1, _string_field(1 if where == "messages.role" else 2, payload)))
        case.wire = wire + extra
        case.bad = {"request"}
        case.label += f"+wire: {where} not UTF-8"
        return
    case.bad, case.may_fail, case.max_tokens = set(), True, None  # might still parse: any answer but a bug
    if how == "garbage appended":
        case.wire = wire + draw(st.binary(min_size=1, max_size=16))
    elif how == "garbage":
        case.wire = draw(st.binary(max_size=32))
    else:
        if case.request.WhichOneof("input") == "messages":  # without max_tokens a chat reply fills the context
            case.request.ClearField("messages")
            case.request.prompt = "hi"
            wire = case.request.SerializeToString()
        case.wire = wire[:draw(st.integers(0, max(0, len(wire) - 1)))]
    case.label += f"+wire: {how}"


def _g_bad_sampling(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    name = draw(st.sampled_from(sorted(GRPC_BAD_SAMPLING)))
    setattr(req.sampling, name, draw(GRPC_BAD_SAMPLING[name]))
    case.bad.add(f"sampling.{name}")
    if name == "max_tokens" and req.sampling.max_tokens >= 1:
        case.max_tokens = None


@benign
def _g_edge_sampling(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    name = draw(st.sampled_from(sorted(GRPC_EDGE_SAMPLING)))
    setattr(req.sampling, name, draw(GRPC_EDGE_SAMPLING[name]))


def _g_empty_prompt(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    req.prompt = ""
    case.bad.add("prompt")


def _g_no_input(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    req.ClearField("input")
    case.bad.add("prompt")


def _g_empty_messages(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    req.messages.SetInParent()
    del req.messages.messages[:]
    case.bad.add("messages")


def _g_unknown_role(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    role = draw(any_text.filter(lambda r: r not in CHAT_ROLES))
    if req.WhichOneof("input") != "messages" or not req.messages.messages:
        req.messages.messages.add(role="user", content="hi")
    req.messages.messages[draw(st.integers(0, len(req.messages.messages) - 1))].role = role
    case.bad.add("messages[")


def _g_bad_token_ids(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    ids = draw(st.lists(token_id, max_size=8))
    bad = draw(st.lists(st.one_of(st.integers(INT32[0], -1), st.integers(VOCAB, INT32[1])), max_size=3))
    req.prompt_token_ids.SetInParent()
    del req.prompt_token_ids.ids[:]
    req.prompt_token_ids.ids.extend(draw(st.permutations(ids + bad)) if bad else [])
    case.bad.add("prompt_token_ids")


def _g_bad_stop_token_ids(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    req.sampling.stop_token_ids.append(draw(st.one_of(st.integers(INT32[0], -1), st.integers(VOCAB, INT32[1]))))
    case.bad.add("sampling.stop_token_ids")


def _g_bad_stop(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    how = draw(st.sampled_from(["empty", "too long", "too many"]))
    if how == "empty":
        req.sampling.stop.append("")
    elif how == "too long":
        req.sampling.stop.append(draw(st.characters(codec="utf-8")) * draw(st.integers(257, 5000)))
    else:
        req.sampling.stop.extend(["s"] * draw(st.integers(17, 200)))
    case.bad.add("sampling.stop")


@benign
def _g_edge_stop(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    del req.sampling.stop[:]
    unit = draw(st.characters(codec="utf-8"))
    req.sampling.stop.extend([unit * 256] * 15 + [draw(any_text.filter(bool))])


@benign
def _g_unset_sampling(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    if req.WhichOneof("input") == "messages":  # a chat reply without max_tokens runs to the full context
        req.sampling.ClearField("max_tokens")
        req.sampling.max_tokens = 0
        case.bad.add("sampling.max_tokens")
    else:
        req.ClearField("sampling")  # OpenAI defaults: 16 tokens at temperature 1
        case.max_tokens = 16


@benign
def _g_weird_ids(draw: st.DrawFn, req: pb.GenerateRequest, case: Case) -> None:
    req.request_id = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)) * draw(st.sampled_from([1, 100]))
    req.session_id = draw(any_text) * 50
    req.cache_salt = draw(any_text) * 50
    req.priority = draw(st.sampled_from(INT32))


GRPC_MUTATIONS: list[Callable[[st.DrawFn, pb.GenerateRequest, Case], None]] = [
    _g_bad_sampling, _g_bad_sampling, _g_bad_sampling, _g_edge_sampling, _g_edge_sampling, _g_empty_prompt,
    _g_no_input, _g_empty_messages, _g_unknown_role, _g_bad_token_ids, _g_bad_stop_token_ids, _g_bad_stop,
    _g_edge_stop, _g_unset_sampling, _g_weird_ids,
]


def run_grpc(clients: Clients, case: Case) -> str | None:
    """Sends one case; returns a failure description, or None. Records the status."""
    req = case.request
    started = time.monotonic()
    responses: list[pb.GenerateResponse] = []
    call = clients.api.Generate(req, timeout=CALL_TIMEOUT_S) if case.wire is None else \
        clients.generate_wire(case.wire, timeout=CALL_TIMEOUT_S)
    try:
        for response in call:
            responses.append(response)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    elapsed = time.monotonic() - started
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"hung: no end after {elapsed:.1f} s ({len(responses)} responses)"
    if code == grpc.StatusCode.OK:
        if case.bad:
            return f"accepted although it breaks {sorted(case.bad)}"
        if not responses:
            return "OK with no response"
        last = responses[-1]
        if last.finish_reason not in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
            return f"stream ended with finish_reason {pb.FinishReason.Name(last.finish_reason)}"
        if any(r.finish_reason for r in responses[:-1]):
            return "finish_reason before the last response"
        num_tokens = sum(len(r.token_ids) for r in responses)
        if not last.HasField("usage") or last.usage.completion_tokens != num_tokens or last.usage.prompt_tokens < 1:
            return f"usage {last.usage} disagrees with {num_tokens} streamed tokens"
        if case.max_tokens is not None and num_tokens > case.max_tokens:
            return f"{num_tokens} tokens, over max_tokens={case.max_tokens}"
        if case.wire is None and req.sampling.HasField("logprobs") and any(len(r.logprobs) != len(r.token_ids) for r in responses):
            return "logprobs missing for some tokens"
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        if not case.bad and not case.may_fail:
            return f"valid request refused: {details}"
        if case.bad and not named(case.bad, details) and not (case.may_fail and "request_id" in details):
            return f"refusal does not name {sorted(case.bad)}: {details!r}"
    elif code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # a full queue is a legitimate answer to anything
        return f"status {code.name}: {details!r}"
    record(clients, case, code.name)
    return None


def record(clients: Clients, case: Case, status: str | int) -> None:
    clients.tally.record(case.door, status)
    if case.heavy:
        with clients.tally.lock:
            clients.tally.heavy[case.door] += 1


def send_batch(clients: Clients, cases: list[Case], run: Callable[[Clients, Case], str | None]) -> None:
    """Sends the cases concurrently; fails with every offending case named."""
    outcomes = list(clients.pool.map(lambda case: _guarded(run, clients, case), cases))
    failures = [(case, why) for case, why in zip(cases, outcomes) if why is not None]
    for case, why in failures:  # failed cases are counted too: the figures cover every request sent
        record(clients, case, "FAILED")
        kind = ("hung" if why.startswith("hung") or "Timeout" in why else
                "internal" if why.startswith(("status INTERNAL", "status UNKNOWN")) else
                "http_5xx" if why.startswith("HTTP 5") else "other")
        with clients.tally.lock:
            clients.tally.failures[kind] += 1
    report = [f"{why}\n    {case.describe()}" for case, why in failures]
    if KEEP_GOING:
        clients.tally.failed.extend(report)
        return
    assert not failures, "\n".join(report[:10])


def _guarded(run: Callable[[Clients, Case], str | None], clients: Clients, case: Case) -> str | None:
    try:
        return run(clients, case)
    except Exception as e:  # noqa: BLE001 - a client-side surprise (read timeout, bad JSON) is a failure too
        return f"{type(e).__name__}: {e}"


def pair_duplicates(draw: st.DrawFn, cases: list[Case]) -> list[tuple[int, int]]:
    """Pairs of cases that will carry the same request id while in flight together."""
    pairs = draw(st.lists(st.tuples(st.integers(0, len(cases) - 1), st.integers(0, len(cases) - 1)), max_size=2))
    pairs = [(i, j) for i, j in pairs if i != j]
    for i, j in pairs:
        cases[i].may_fail = cases[j].may_fail = True  # the second may be refused, naming request_id
    return pairs


@st.composite
def grpc_batch(draw: st.DrawFn) -> tuple[list[Case], list[tuple[int, int]]]:
    cases = draw(st.lists(grpc_case(), min_size=BATCH, max_size=BATCH))
    return cases, pair_duplicates(draw, cases)


def test_grpc_generate_fuzz(clients: Clients) -> None:
    @settings(max_examples=-(-NUM_GRPC // BATCH), **FUZZ_SETTINGS)
    @given(grpc_batch())
    def fuzz(batch: tuple[list[Case], list[tuple[int, int]]]) -> None:
        cases, duplicates = batch
        b = next(clients.batches)
        for k, case in enumerate(cases):  # unique across the run, except the deliberate duplicates
            if case.request.request_id:
                case.request.request_id = f"fz{b}.{k}-{case.request.request_id}"
        for i, j in duplicates:
            cases[i].request.request_id = cases[j].request.request_id = f"dup{b}.{i}.{j}"
        send_batch(clients, cases, run_grpc)

    fuzz()
    assert not clients.tally.failed, "\n".join(clients.tally.failed[:50])
    assert clients.tally.sent["grpc"] >= NUM_GRPC, clients.tally.line()


# --- HTTP cases --------------------------------------------------------------------------------------

SURROGATES = ["\ud800", "a\udfffb", "\udc00\ud800"]  # JSON "\ud800" escapes: valid JSON, invalid text
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False), any_text)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(any_text, inner, max_size=3)),
                          max_leaves=6)

# param -> JSON values that break it; a 400 must name the param.
HTTP_BAD_COMMON: dict[str, list[Any]] = {
    "temperature": [-1, -1e-9, NAN, INF, -INF, "hot", [1], {"a": 1}, 1e39],
    "top_p": [0, -0.5, 1.5, NAN, INF, "x", 1e-50],
    "top_k": [-1, 1.5, "k", 1 << 31, 10**20, -(10**20)],
    "min_p": [-0.1, 1.1, NAN, "x"],
    "repetition_penalty": [0, -1, NAN, INF, 1e39, 1e-50, "x"],
    "presence_penalty": [2.5, -3, NAN, 1e39, "x"],
    "frequency_penalty": [2.5, -3, -INF, "x"],
    "seed": [1.5, "s", 1 << 63, -(1 << 63) - 1, 10**30, [1]],
    "stop": ["", [""], ["a"] * 17, "x" * 257, 5, [1], {"a": "b"}, ["ok", "\ud800"]],
    "stop_token_ids": [[-1], [VOCAB], "x", [1.5], [1 << 40]],
    "n": [0, 17, -1, "x", 10**20],
    "logit_bias": [{"x": 1}, {"1": 101}, {"1": -100.5}, {str(VOCAB): 1}, {"-1": 1}, {"1": "x"}, [1], 5],
    "stream": ["maybe", 2, [], {}],
    "ignore_eos": ["maybe", 2, []],
    "model": ["nope", "", "\ud800", 5, ["tiny-llama"], "tiny-llama "],
    "user": [5, [], {}],
    "session_id": [5, [], *SURROGATES],
    "cache_salt": [5.5, {}, *SURROGATES],
    "priority": [1.5, "p", 1 << 31, -(1 << 31) - 1, 10**30],
}
HTTP_BAD_COMPLETIONS: dict[str, list[Any]] = {
    "prompt": ["", [], [[1], [2]], ["a", "b"], [-1], [VOCAB], [1, VOCAB + 5], 5, None, {"a": 1}, [[]], [""],
               [1, "a"], True, [[-1]], [1 << 40], *SURROGATES, [SURROGATES[0]]],
    "logprobs": [-1, 21, "x", 1.5, 1 << 40],
    "echo": [True, 2],
    "best_of": [2, 0, "x"],
    "suffix": ["x", 5],
    "max_tokens": [0, -1, MAX_MODEL_LEN, 10**30, "x", 1.5, [4]],
}
HTTP_BAD_CHAT: dict[str, list[Any]] = {
    "messages": [[], "hi", [{}], None, [{"role": "wizard", "content": "x"}], [{"role": 5, "content": "x"}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": 5}],
                 *([{"role": "user", "content": s}] for s in SURROGATES),
                 [{"role": "user", "content": [{"type": "text", "text": SURROGATES[0]}]}]],
    "max_completion_tokens": [0, -1, MAX_MODEL_LEN, 10**30, "x"],
    "logprobs": ["x", 2, []],
    "tools": [[{"type": "retrieval"}], [{"type": "function"}], [{"type": "function", "function": {"name": "a b"}}],
              [{"type": "function", "function": {"name": "f", "parameters": []}}], "x"],
    "tool_choice": ["sometimes", 5, {"type": "function", "function": {"name": "f"}}],
    "response_format": [{"type": "json_schema"}, {"type": 5}, "text", {"type": "yaml"},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}],
}


@st.composite
def http_sampling(draw: st.DrawFn, body: dict[str, Any]) -> None:
    optional = {
        "temperature": st.one_of(st.just(0), f32(0.0, 2.0)),
        "top_p": f32(0.01, 1.0),
        "top_k": st.integers(-1, 100).map(lambda k: max(k, 0)),
        "min_p": f32(0.0, 1.0),
        "repetition_penalty": f32(0.5, 2.0),
        "presence_penalty": f32(-2.0, 2.0),
        "frequency_penalty": f32(-2.0, 2.0),
        "seed": st.integers(*INT64),
        "stop": st.one_of(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6),
                          st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6), max_size=3)),
        "stop_token_ids": st.lists(token_id, max_size=3),
        "ignore_eos": st.booleans(),
        "n": st.just(1),
        "user": any_text,
        "session_id": any_text,
        "cache_salt": any_text,
        "priority": st.integers(*INT32),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=6, unique=True)):
        body[name] = draw(optional[name])


@st.composite
def http_case(draw: st.DrawFn) -> Case:
    if draw(one_in(8)):
        return draw(raw_http_case())
    endpoint = draw(st.sampled_from(["completions", "chat"]))
    case = Case("http", endpoint, path="/v1/completions" if endpoint == "completions" else "/v1/chat/completions")
    case.max_tokens = draw(st.integers(1, 4))
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["model"] = "tiny-llama"  # replaced by the served name at send time
    if endpoint == "completions":
        ids = st.lists(token_id, min_size=1, max_size=16)
        body["prompt"] = draw(st.one_of(prompt_text, ids, prompt_text.map(lambda p: [p]), ids.map(lambda p: [p])))
        body["max_tokens"] = case.max_tokens
        if draw(st.booleans()):
            body["logprobs"] = draw(st.integers(0, 5))
        for name, value in draw(st.lists(st.sampled_from([("echo", False), ("best_of", 1), ("suffix", "")]),
                                         max_size=2, unique_by=lambda kv: kv[0])):
            body[name] = value
    else:
        content = st.one_of(any_text, st.none(),
                            st.lists(any_text.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=2))
        body["messages"] = [{"role": role, "content": c} for role, c in
                            draw(st.lists(st.tuples(st.sampled_from(CHAT_ROLES), content), min_size=1, max_size=3))]
        body["max_completion_tokens" if draw(st.booleans()) else "max_tokens"] = case.max_tokens
        if draw(st.booleans()):
            body["logprobs"] = True
            if draw(st.booleans()):
                body["top_logprobs"] = draw(st.integers(0, 20))
        for name, value in draw(st.lists(st.sampled_from([("tools", []), ("response_format", {"type": "text"})]),
                                         max_size=2, unique_by=lambda kv: kv[0])):
            body[name] = value
    draw(http_sampling(body))
    case.stream = body["stream"] = draw(st.booleans())
    if case.stream and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    labels = [endpoint, "stream" if case.stream else "whole"]
    case.headers["content-type"] = "application/json"
    if draw(st.booleans()):
        case.headers["x-request-id"] = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12))

    for mutation in in_order(draw(st.lists(st.sampled_from(HTTP_MUTATIONS), max_size=2, unique=True))):
        labels.append(mutation.__name__.removeprefix("_h_"))
        mutation(draw, body, case, endpoint)
    indent = draw(st.sampled_from([None, None, 2]))
    case.body = json.dumps(body, allow_nan=True, indent=indent).encode()
    if draw(heavy_gate) and endpoint == "completions":
        size = draw(st.sampled_from([MAX_REQUEST_BYTES - 4096, MAX_REQUEST_BYTES + 1]))
        body["prompt"] = "hello world " * (size // 12)
        case.body = json.dumps(body, allow_nan=True).encode()
        case.bad |= {"request_too_large", "max_tokens", "prompt"}  # over the byte cap, or over max_model_len tokens
        case.heavy = True
        labels.append(f"{len(case.body)}-byte body")
    case.label = "+".join(labels)
    case.json_body = body
    return case


def _pick(draw: st.DrawFn, table: dict[str, list[Any]]) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(table)))
    return name, draw(st.sampled_from(table[name]))


def _h_bad_common(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    name, value = _pick(draw, HTTP_BAD_COMMON)
    body[name] = value
    if name == "stream" and not case.stream:
        body.pop("stream_options", None)
    case.bad.add(name)


def _h_bad_endpoint(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    name, value = _pick(draw, HTTP_BAD_COMPLETIONS if endpoint == "completions" else HTTP_BAD_CHAT)
    body[name] = value
    if name == "messages" and isinstance(value, list) and value:
        name = "messages["  # the param is messages[i].role or messages[i].content
    case.bad.add(name)


def _h_bad_chat_max_tokens(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    # max_completion_tokens wins over max_tokens, so break the one that counts.
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    body[name] = draw(st.sampled_from(HTTP_BAD_COMPLETIONS["max_tokens"]))
    case.bad.add(name)


def _h_bad_top_logprobs(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    if endpoint == "completions":
        body["logprobs"] = draw(st.sampled_from([-1, 21, 1 << 40]))
        case.bad.add("logprobs")
    elif draw(st.booleans()):
        body["logprobs"], body["top_logprobs"] = True, draw(st.sampled_from([21, -1, 10**9, "x"]))
        case.bad.add("top_logprobs")
    else:
        body["logprobs"], body["top_logprobs"] = False, draw(st.integers(0, 20))
        case.bad.add("top_logprobs")


def _h_bad_message(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    if endpoint != "chat":
        body.pop("prompt", None)
        case.bad.add("prompt")  # missing
        return
    if not (isinstance(body.get("messages"), list) and body["messages"]
            and all(isinstance(m, dict) for m in body["messages"])):
        body["messages"] = [{"role": "user", "content": "hi"}]
    message = body["messages"][draw(st.integers(0, len(body["messages"]) - 1))]
    how = draw(st.sampled_from(["role", "no role", "content"]))
    if how == "role":
        message["role"] = draw(any_text.filter(lambda r: r not in CHAT_ROLES))
    elif how == "no role":
        del message["role"]
    else:
        message["content"] = draw(st.sampled_from(SURROGATES))
    case.bad.add("messages[")


def _h_missing_input(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    name = "prompt" if endpoint == "completions" else "messages"
    body.pop(name, None)
    case.bad.add(name)


def _h_stream_options_without_stream(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    case.stream = body["stream"] = False
    body["stream_options"] = {"include_usage": True}
    case.bad.add("stream_options")


@benign
def _h_edge(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    """Extreme values that are still valid."""
    edges: dict[str, list[Any]] = {
        "seed": [INT64[0], INT64[1], 0, -1],
        "priority": list(INT32),
        "top_k": [INT32[1], VOCAB, 1],
        "temperature": [1e-50, F32_DENORMAL_MIN, 1e-6, 3.4e38, 100],
        "top_p": [1, 1e-6],
        "repetition_penalty": [1e-30, 1e30],
        "presence_penalty": [-2, 2],
        "frequency_penalty": [-2.0, 2.0],
        "n": [1, 1.0],
        "stop": [["\U0010ffff" * 256] * 16, "🚀" * 256],
        "stop_token_ids": [[0, VOCAB - 1] * 8],
        "ignore_eos": [True, "true", 1],
        "user": ["x" * 10000],
        "session_id": ["\U0001f680" * 1000],
        "model": ["tiny-llama"],
    }
    name, value = _pick(draw, edges)
    body[name] = value


@benign
def _h_unknown_fields(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    for key, value in draw(st.dictionaries(any_text, json_value, min_size=1, max_size=3)).items():
        body[f"x_fuzz_{key}"] = value


def _h_unset_max_tokens(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    if endpoint == "completions":  # OpenAI's default: 16
        body.pop("max_tokens", None)
        case.max_tokens = 16
        case.bad.discard("max_tokens")  # a bad value drawn by an earlier mutation is gone with the field
    else:  # a chat reply without max_tokens runs to the full context: break it instead
        _h_bad_chat_max_tokens(draw, body, case, endpoint)


@benign
def _h_headers(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    """The body is parsed as JSON whatever the content type says."""
    ctype = draw(st.sampled_from([None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-8",
                                  "multipart/form-data; boundary=x", "application/octet-stream", "*/*"]))
    case.headers.pop("content-type")
    if ctype is not None:
        case.headers["content-type"] = ctype
    if draw(st.booleans()):
        case.headers["accept"] = draw(st.sampled_from(["text/event-stream", "application/xml", "*/*"]))


@benign
def _h_token_prompt_edges(draw: st.DrawFn, body: dict[str, Any], case: Case, endpoint: str) -> None:
    if endpoint == "completions":
        body["prompt"] = draw(st.sampled_from([[0], [VOCAB - 1], [1, 2, 3], [[0, VOCAB - 1]], "\x00", "\u202e🚀"]))


HTTP_MUTATIONS: list[Callable[[st.DrawFn, dict[str, Any], Case, str], None]] = [
    _h_bad_common, _h_bad_common, _h_bad_common, _h_bad_endpoint, _h_bad_endpoint, _h_bad_chat_max_tokens,
    _h_bad_top_logprobs, _h_bad_message, _h_missing_input, _h_stream_options_without_stream, _h_edge, _h_edge,
    _h_unknown_fields, _h_unset_max_tokens, _h_headers, _h_token_prompt_edges,
]


@st.composite
def raw_http_case(draw: st.DrawFn) -> Case:
    """Whole-body chaos: any 4xx is a fine refusal; a 200 must still be a proper answer."""
    case = Case("http", "raw", raw=True, path=draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"])))
    kind = draw(spread(["binary", "truncated", "not an object", "deep", "huge int", "bad utf-8", "empty",
                        "method", "path", "form", "bom", "oversize"]))
    valid = json.dumps({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    if kind == "binary":
        case.body = draw(st.binary(max_size=64))
    elif kind == "truncated":
        case.body = valid[:draw(st.integers(0, len(valid) - 1))]
    elif kind == "not an object":
        case.body = draw(st.sampled_from([b"[]", b"1", b'"s"', b"null", b"true", b"[{}]", b"NaN", b"-Infinity"]))
    elif kind == "deep":
        depth = draw(st.sampled_from([1000, 100_000]))
        case.body = draw(st.sampled_from([b"[" * depth, b'{"a":' * depth, b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"]))
    elif kind == "huge int":
        digits = draw(st.sampled_from([30, 4300, 5000, 100_000]))
        field_name = draw(st.sampled_from([b"max_tokens", b"seed", b"top_k", b"priority", b"n"]))
        case.body = b'{"prompt": "hi", "messages": [], "' + field_name + b'": ' + b"9" * digits + b"}"
    elif kind == "bad utf-8":
        case.body = b'{"prompt": "' + draw(st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf", b"a\x80"])) + b'"}'
    elif kind == "empty":
        case.body = b""
    elif kind == "method":
        case.method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
        case.body = valid
    elif kind == "path":
        case.path = draw(st.sampled_from(["/v1/completion", "/v1/chat", "/v2/completions", "/v1/completions/x"]))
        case.body = valid
    elif kind == "form":
        case.body = b"prompt=hi&max_tokens=2"
        case.headers["content-type"] = "application/x-www-form-urlencoded"
    elif kind == "bom":
        case.body = b"\xef\xbb\xbf" + valid
        case.max_tokens = 2
    elif kind == "oversize":
        case.body = b'{"prompt": "' + b"a" * (MAX_REQUEST_BYTES + draw(st.integers(1, 1000))) + b'"}'
        case.heavy = True
    if kind not in ("form",) and draw(st.booleans()):
        case.headers["content-type"] = draw(st.sampled_from(["application/json", "text/plain"]))
    case.label = f"raw {kind}"
    return case


def _error_of(payload: Any) -> dict[str, Any] | None:
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"]:
        return None
    return error


def _check_answer(case: Case, payload: dict[str, Any]) -> str | None:
    """A whole (non-streamed) 200 answer."""
    choices = payload.get("choices")
    if not choices or choices[0].get("finish_reason") not in ("stop", "length"):
        return f"answer without a finish_reason: {payload}"
    completion_tokens = (payload.get("usage") or {}).get("completion_tokens")
    if not isinstance(completion_tokens, int):
        return f"answer without usage: {payload}"
    if case.max_tokens is not None and completion_tokens > case.max_tokens:
        return f"{completion_tokens} tokens, over max_tokens={case.max_tokens}"
    return None


def _check_events(case: Case, events: list[str]) -> str | None:
    """A streamed 200 answer: JSON events, then `[DONE]`; an error event only as the last before it."""
    if not events or events[-1] != "[DONE]":
        return f"stream does not end with [DONE]: {events[-3:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:
        if "error" not in chunks[-1] or len(errors) > 1:
            return f"an error event that is not the last: {chunks}"
        if errors[0].get("type") == "server_error" or not errors[0].get("message"):
            return f"server error in the stream: {errors[0]}"
        return None
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    if not finishes or finishes[-1] not in ("stop", "length") or any(finishes[:-1]):
        return f"stream finish_reasons {finishes}"
    usage = chunks[-1].get("usage")
    if isinstance(usage, dict) and case.max_tokens is not None and usage["completion_tokens"] > case.max_tokens:
        return f"{usage['completion_tokens']} tokens, over max_tokens={case.max_tokens}"
    return None


def run_http(clients: Clients, case: Case) -> str | None:
    started = time.monotonic()
    with clients.http.stream(case.method, case.path, content=case.body, headers=case.headers) as response:
        status, ctype = response.status_code, response.headers.get("content-type", "")
        events: list[str] = []
        if status == 200 and ctype.startswith("text/event-stream"):
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                elif line:
                    return f"not an SSE line: {line!r}"
        raw = response.read() if not events else b""
    elapsed = time.monotonic() - started
    if elapsed > CALL_TIMEOUT_S:
        return f"hung: {elapsed:.1f} s"
    if status >= 500:
        return f"HTTP {status}: {raw[:500]!r}"
    if status == 200:
        if case.bad and not case.raw:
            return f"accepted although it breaks {sorted(case.bad)}"
        if events:
            why = _check_events(case, events)
        else:
            if case.stream and not case.raw:
                return f"asked to stream, got {ctype}"
            why = _check_answer(case, json.loads(raw))
        if why:
            return why
    else:
        try:
            error = _error_of(json.loads(raw))
        except ValueError:
            error = None
        if error is None:
            return f"HTTP {status} without an OpenAI error body: {raw[:300]!r}"
        if status == 400 and not case.raw:
            if not case.bad and not case.may_fail:
                return f"valid request refused: {error}"
            if case.bad and not (named(case.bad, error.get("param")) or named(case.bad, error["message"])
                                 or named(case.bad, error.get("code"))):
                if not (case.may_fail and error.get("param") == "request_id"):
                    return f"400 does not name {sorted(case.bad)}: {error}"
        elif status == 413 and not case.heavy:
            return f"413 for a small body: {error}"
        elif status not in (400, 413, 429) and not case.raw:
            return f"HTTP {status}: {error}"
    record(clients, case, status)
    return None


@st.composite
def http_batch(draw: st.DrawFn) -> tuple[list[Case], list[tuple[int, int]]]:
    cases = draw(st.lists(http_case(), min_size=BATCH, max_size=BATCH))
    pairs = [(i, j) for i, j in pair_duplicates(draw, cases) if not (cases[i].raw or cases[j].raw)]
    return cases, pairs


def test_http_body_fuzz(clients: Clients) -> None:
    @settings(max_examples=-(-NUM_HTTP // BATCH), **FUZZ_SETTINGS)
    @given(http_batch())
    def fuzz(batch: tuple[list[Case], list[tuple[int, int]]]) -> None:
        cases, duplicates = batch
        b = next(clients.batches)
        for k, case in enumerate(cases):
            body = case.json_body
            if body is not None and body.get("model") == "tiny-llama":
                body["model"] = clients.model
                case.body = json.dumps(body, allow_nan=True).encode()
            if "x-request-id" in case.headers:
                case.headers["x-request-id"] = f"fz{b}.{k}-{case.headers['x-request-id']}"
        for i, j in duplicates:
            cases[i].headers["x-request-id"] = cases[j].headers["x-request-id"] = f"dup{b}.{i}.{j}"
        send_batch(clients, cases, run_http)

    fuzz()
    assert not clients.tally.failed, "\n".join(clients.tally.failed[:50])
    assert clients.tally.sent["http"] >= NUM_HTTP, clients.tally.line()


# --- afterwards -------------------------------------------------------------------------------------

PROMPTS = ["The scheduler owns every block table.", "Ünïcödé 東京 🚀", "x"]


def assert_quiescent(clients: Clients) -> None:
    """Nothing live in the scheduler, no KV block in use on any worker (after the last aborts settle)."""
    deadline = time.monotonic() + 15
    while True:
        stats = clients.scheduler.GetStats(sched_pb.GetStatsRequest(), timeout=5)
        idle = stats.num_live_requests == 0 and all(w.num_blocks_used == 0 for w in stats.workers)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stats.num_live_requests == 0, stats
    assert len(stats.workers) == 2, stats
    for w in stats.workers:
        assert w.up and w.num_blocks_used == 0 and w.num_running_requests == 0 and w.num_waiting_requests == 0, w
        assert w.num_blocks_used + w.num_blocks_cached + w.num_blocks_free == w.num_blocks_total, w


def test_stack_still_serves_correct_answers(clients: Clients, tiny_model_dir) -> None:
    for p in clients.stack.processes:
        os.kill(p.pid, 0)  # every process of the stack is still there
        log = Path(p.log).read_text(errors="replace")
        assert "Traceback" not in log and "unexpected error" not in log, f"{p.name} logged a bug:\n{log[-3000:]}"
    assert_quiescent(clients)
    for prompt in PROMPTS:
        ids = list(clients.api.Tokenize(pb.TokenizeRequest(prompt=prompt, add_special_tokens=True), timeout=10).token_ids)
        request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
            max_tokens=16, temperature=0.0, ignore_eos=True))
        responses = list(clients.api.Generate(request, timeout=CALL_TIMEOUT_S))
        tokens = [t for r in responses for t in r.token_ids]
        text = "".join(r.text for r in responses)
        assert_greedy_matches(hf_greedy(tiny_model_dir, ids, 16), tokens, prompt)
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH and len(tokens) == 16
        # The same through HTTP, whole and streamed: the same text.
        payload = {"model": clients.model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        answer = clients.http.post("/v1/completions", json=payload)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == text
        with clients.http.stream("POST", "/v1/completions", json={**payload, "stream": True}) as response:
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        assert events[-1] == "[DONE]"
        assert "".join(c["choices"][0]["text"] for c in map(json.loads, events[:-1]) if c.get("choices")) == text
    assert_quiescent(clients)
    tally = clients.tally
    assert sum(tally.sent.values()) >= NUM_GRPC + NUM_HTTP >= 10_000, tally.line()
    assert not tally.failures, tally.line()
