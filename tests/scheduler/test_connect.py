"""The scheduler's Connect stream, driven directly: many requests on one stream, each ending on its own.

The front door uses this stream for every request; these tests hold the scheduler to what the front
door relies on: a request's failure ends that request only, an abort stops its events at once,
and a stream that closes takes every request on it down with it (nothing leaked).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from switchyard.api.v1 import generation_pb2 as api_pb
from switchyard.scheduler.v1 import scheduler_pb2 as pb

from tests.inprocess import Stack
from tests.scheduler.test_service import blocks_in_use, collect, greedy_request, prompts

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def stack(tiny_model_dir):
    async with Stack(tiny_model_dir) as running:
        yield running


class Stream:
    """One Connect call: send submissions and aborts, read events per request."""

    def __init__(self, stub) -> None:
        self.call = stub.Connect()
        self.events: dict[str, list[pb.TokenEvent]] = {}
        self.num_messages = 0
        self.max_requests_per_message = 0

    async def send(self, submissions=(), aborts=()) -> None:
        await self.call.write(pb.ConnectRequest(submissions=submissions, abort_request_ids=aborts))

    async def read_until_ended(self, request_ids: set[str], timeout_s: float = 60) -> None:
        async def read() -> None:
            while not all(self.ended(r) for r in request_ids):
                message = await self.call.read()
                assert message is not grpc.aio.EOF, "the stream ended with requests still open"
                self.num_messages += 1
                self.max_requests_per_message = max(self.max_requests_per_message,
                                                    len({e.request_id for e in message.events}))
                for event in message.events:
                    assert not self.ended(event.request_id), f"{event.request_id}: an event after its last"
                    self.events.setdefault(event.request_id, []).append(event)
        await asyncio.wait_for(read(), timeout_s)

    def ended(self, request_id: str) -> bool:
        events = self.events.get(request_id)
        return bool(events) and (events[-1].finish_reason != api_pb.FINISH_REASON_UNSPECIFIED
                                 or events[-1].error_code != 0)

    def tokens(self, request_id: str) -> list[int]:
        return [t for e in self.events[request_id] for t in e.token_ids]


async def settled(stack) -> bool:
    for _ in range(100):
        if not stack.fleet.live and await blocks_in_use(stack.stub) == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_many_requests_share_one_stream_and_get_what_generate_gives(stack) -> None:
    batch = prompts(12, 4096, seed=21, hi=60)
    stream = Stream(stack.stub)
    await stream.send([greedy_request(f"s{i}", p, 10) for i, p in enumerate(batch)])
    await stream.read_until_ended({f"s{i}" for i in range(len(batch))})
    for i, prompt in enumerate(batch):
        tokens, last, _ = await collect(stack.stub, greedy_request(f"g{i}", prompt, 10))
        assert stream.tokens(f"s{i}") == tokens
        final = stream.events[f"s{i}"][-1]
        assert final.finish_reason == api_pb.FINISH_REASON_LENGTH and final.error_code == 0
        assert final.num_prompt_tokens == len(prompt) and final.num_output_tokens == 10
    # One step's events for several requests travel in one message.
    assert stream.max_requests_per_message > 1
    stream.call.cancel()
    assert await settled(stack)


async def test_a_bad_request_ends_alone_with_its_status_and_the_stream_goes_on(stack) -> None:
    stream, other = Stream(stack.stub), Stream(stack.stub)
    await stream.send([greedy_request("good", prompts(1, 4096, seed=3)[0], 8), greedy_request("empty", [], 4),
                       greedy_request("late", [5, 6, 7], 4, timeout_s=-1.0)])
    await other.send([greedy_request("good", [5, 6, 7], 4)])  # the id is live on the other stream
    await other.read_until_ended({"good"})
    await stream.read_until_ended({"good", "empty", "late"})
    [empty] = stream.events["empty"]
    assert empty.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert empty.error_field == "prompt_token_ids" and empty.error_message.startswith("prompt_token_ids")
    [late] = stream.events["late"]
    assert late.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and late.error_field == "deadline"
    [refused] = other.events["good"]
    assert refused.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and refused.error_field == "request_id"
    assert len(stream.tokens("good")) == 8 and stream.events["good"][-1].error_code == 0
    stream.call.cancel()
    other.call.cancel()
    assert await settled(stack)


async def test_an_abort_stops_the_request_at_once_and_frees_its_blocks(stack) -> None:
    stream = Stream(stack.stub)
    await stream.send([greedy_request("long", [9] * 40, 400), greedy_request("short", [8] * 20, 30)])
    while not stream.events.get("long"):
        for event in (await stream.call.read()).events:
            stream.events.setdefault(event.request_id, []).append(event)
    await stream.send(aborts=["long"])
    await asyncio.sleep(0.1)
    assert "long" not in stack.fleet.live
    num_seen = len(stream.tokens("long"))
    await stream.read_until_ended({"short"})
    assert len(stream.tokens("long")) <= num_seen + 1  # at most the step already on its way
    assert not stream.ended("long")  # an abort asked for is not answered with an event
    stream.call.cancel()
    assert await settled(stack)


async def test_closing_the_stream_aborts_everything_on_it(stack) -> None:
    stream = Stream(stack.stub)
    await stream.send([greedy_request(f"c{i}", p, 500) for i, p in enumerate(prompts(6, 4096, seed=9))])
    await stream.call.read()  # running now
    assert len(stack.fleet.live) == 6
    stream.call.cancel()  # the front door went away
    assert await settled(stack), "requests of a closed stream still hold blocks"


async def test_events_name_their_pool_and_the_stream_announces_routable_pools(stack) -> None:
    stream = Stream(stack.stub)
    await stream.send([greedy_request("first", [5, 6, 7], 4)])
    first = await stream.call.read()
    # The routable pools ride on the stream's first message, before its events take effect.
    assert first.HasField("routable")
    assert [(p.name, p.version) for p in first.routable.pools] == [("default", "v1")]
    for event in first.events:
        stream.events.setdefault(event.request_id, []).append(event)
    await stream.read_until_ended({"first"})
    assert all((e.pool, e.model_version) == ("default", "v1") for e in stream.events["first"])
    # A weight change is announced at once, in a message of its own (no request is running).
    await stack.admin.SetPoolWeight(pb.SetPoolWeightRequest(pool="default", weight=0.0))
    try:
        gone = await asyncio.wait_for(stream.call.read(), 10)
        assert gone.HasField("routable") and list(gone.routable.pools) == [] and not gone.events
    finally:
        await stack.admin.SetPoolWeight(pb.SetPoolWeightRequest(pool="default", weight=1.0))
    back = await asyncio.wait_for(stream.call.read(), 10)
    assert [(p.name, p.version) for p in back.routable.pools] == [("default", "v1")]
    # Unchanged since: later messages say nothing about it.
    await stream.send([greedy_request("second", [5, 6, 7], 4)])
    later = await asyncio.wait_for(stream.call.read(), 30)
    assert not later.HasField("routable") and later.events[0].model_version == "v1"
    stream.call.cancel()
    assert await settled(stack)
