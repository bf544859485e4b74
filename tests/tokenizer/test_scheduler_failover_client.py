"""The front door's SchedulerClient across a scheduler failover: two real schedulers on one lease
file drive the same tiny-model workers over loopback gRPC. When the leader dies mid-stream, the
request resumes on the new leader from prompt + tokens already streamed, with what is left of its
deadline and its pool, and the client sees the tokens it would have seen without the fault."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from services.scheduler.router import PoolConfig
from services.tokenizer.api_types import GenerateInput, ResponseFormat, SchedulerEvent
from services.tokenizer.codec import Codec
from services.tokenizer.structured_output import grammar_for
from services.tokenizer.scheduler_client import SchedulerClient
from shared.errors import Unavailable
from shared.sampling_rules import SamplingFields
from tests.schedulers import ELSEWHERE, Scheduler, fleet_maker, hold_lease, leased, serve_worker, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = (17, 301, 52, 9, 4000, 123, 77, 5)
GREEDY = SamplingFields(max_tokens=48, temperature=0.0, ignore_eos=True)
SEEDED = SamplingFields(max_tokens=48, temperature=1.0, top_k=40, seed=1234, ignore_eos=True)
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
async def workers(tiny_model_dir):
    servers = [await serve_worker(tiny_model_dir) for _ in range(2)]
    yield [s.target for s in servers]
    for server in servers:
        await server.shutdown()


async def leader_and_standby(tmp_path, leader_pools: tuple[PoolConfig, ...],
                             standby_pools: tuple[PoolConfig, ...] | None = None) -> tuple[Scheduler, Scheduler]:
    lease = tmp_path / "lease"
    a = await leased(lease, fleet_maker(*leader_pools))
    await wait_for(lambda: a.leadership.fleet is not None, "a leads")
    b = await leased(lease, fleet_maker(*(standby_pools or leader_pools)))
    await wait_for(lambda: b.leadership.leader == a.address, "b stands by")
    return a, b


async def generate(client: SchedulerClient, request_id: str, sampling: SamplingFields, on_event=None,
                   timeout_s: float = TIMEOUT_S, grammar: str = "") -> tuple[list[int], SchedulerEvent]:
    inp = GenerateInput(request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling, timeout_s=timeout_s,
                        grammar=grammar)
    tokens: list[int] = []
    last = None
    async for event in client.stream(request_id, list(PROMPT), inp):
        tokens.extend(event.token_ids)
        last = event
        if on_event is not None:
            await on_event(tokens)
    assert last is not None
    return tokens, last


class KillAfter:
    """Kills the leader once the client has been given `num_tokens` tokens."""

    def __init__(self, leader: Scheduler, num_tokens: int) -> None:
        self.leader, self.num_tokens = leader, num_tokens
        self.num_streamed: int | None = None  # tokens the client had when the leader was killed
        self.killed_s = 0.0

    async def __call__(self, tokens: list[int]) -> None:
        if self.num_streamed is None and len(tokens) >= self.num_tokens:
            self.num_streamed, self.killed_s = len(tokens), time.monotonic()
            await self.leader.kill()


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_a_request_resumes_on_the_new_leader_with_the_same_tokens(tmp_path, workers, sampling) -> None:
    pool = PoolConfig("default", "v1", 1.0, (workers[0],))
    a, b = await leader_and_standby(tmp_path, (pool,))
    client = SchedulerClient([a.address, b.address], failover_timeout_s=10)
    try:
        expected, last = await generate(client, "no-fault", sampling)
        assert len(expected) == 48 and last.finish_reason == "length" and client.num_resubmissions == 0
        a_epoch = a.leadership.epoch

        kill = KillAfter(a, 4)
        tokens, last = await generate(client, "failover", sampling, on_event=kill)
        assert kill.num_streamed is not None and kill.num_streamed < 48, "the leader was not killed mid-stream"
        assert client.num_resubmissions >= 1
        assert tokens == expected  # no gap, no duplicate, the same continuation
        assert last.finish_reason == "length"
        assert last.num_prompt_tokens == len(PROMPT)  # the resumed tokens are not counted as prompt
        assert client.address == b.address
        assert b.leadership.fleet is not None and b.leadership.epoch > a_epoch
    finally:
        await client.close()
        await b.close()
        await a.close()


async def test_a_constrained_request_resumes_inside_its_grammar(tmp_path, workers, tiny_model_dir) -> None:
    """The new leader's worker rebuilds the grammar state from the resumed tokens: the answer is the
    one without the fault, and valid (the tiny model's weights are random, so only the mask makes it so)."""
    schema = {"type": "object", "properties": {"values": {"type": "array", "minItems": 6, "maxItems": 6,
                                                          "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
              "required": ["values"], "additionalProperties": False}
    grammar = grammar_for(ResponseFormat("json_schema", json.dumps(schema)))
    sampling = SamplingFields(max_tokens=200, temperature=0.8, seed=9)
    pool = PoolConfig("default", "v1", 1.0, (workers[0],))
    a, b = await leader_and_standby(tmp_path, (pool,))
    client = SchedulerClient([a.address, b.address], failover_timeout_s=10)
    try:
        expected, last = await generate(client, "no-fault", sampling, grammar=grammar)
        assert last.finish_reason == "stop"
        values = json.loads(Codec(tiny_model_dir).tokenizer.decode(expected, skip_special_tokens=True))["values"]
        assert len(values) == 6
        kill = KillAfter(a, 4)
        tokens, last = await generate(client, "failover", sampling, on_event=kill, grammar=grammar)
        assert kill.num_streamed is not None and kill.num_streamed < len(expected), "not killed mid-stream"
        assert client.num_resubmissions >= 1
        assert tokens == expected and last.finish_reason == "stop"
    finally:
        await client.close()
        await b.close()
        await a.close()


async def test_the_resubmission_carries_the_remaining_deadline_and_the_pool(tmp_path, workers) -> None:
    # The new leader's weights would send a new request to "canary"; the resumed one stays where
    # its first tokens were computed.
    a, b = await leader_and_standby(
        tmp_path,
        (PoolConfig("stable", "v1", 1.0, (workers[0],)), PoolConfig("canary", "v2", 0.0, (workers[1],))),
        (PoolConfig("stable", "v1", 0.0, (workers[0],)), PoolConfig("canary", "v2", 1.0, (workers[1],))))
    client = SchedulerClient([a.address, b.address], failover_timeout_s=10)
    kill = KillAfter(a, 4)
    seen: dict[str, object] = {}
    streamed_at_kill: list[int] = []

    async def on_event(tokens: list[int]) -> None:
        await kill(tokens)
        if kill.num_streamed is not None and not streamed_at_kill:
            streamed_at_kill.extend(tokens)
        fleet = b.leadership.fleet
        if "request" not in seen and fleet is not None and "r1" in fleet.live:
            live = fleet.live["r1"]
            seen.update(request=live.request, pool=live.decision.pool, at_s=time.monotonic(),
                        resumed=list(live.request.output_token_ids[:kill.num_streamed]))
    try:
        started_s = time.monotonic()
        tokens, last = await generate(client, "r1", SamplingFields(max_tokens=300, temperature=0.0, ignore_eos=True),
                                      on_event=on_event)
        assert len(tokens) == 300 and client.num_resubmissions >= 1
        assert "request" in seen, "the new leader never ran the request"
        assert seen["pool"] == "stable" and last.served_by is not None and last.served_by.name == "stable"
        assert seen["resumed"] == streamed_at_kill == tokens[:kill.num_streamed]
        request = seen["request"]
        sent_timeout_s = request.deadline_s - request.arrival_s  # the timeout the resubmission carried
        assert TIMEOUT_S - (seen["at_s"] - started_s) - 0.05 <= sent_timeout_s
        assert sent_timeout_s <= TIMEOUT_S - (kill.killed_s - started_s)
    finally:
        await client.close()
        await b.close()
        await a.close()


async def test_a_draining_leader_finishes_its_requests_and_new_ones_go_to_its_successor(tmp_path, workers) -> None:
    pool = PoolConfig("default", "v1", 1.0, (workers[0],))
    a, b = await leader_and_standby(tmp_path, (pool,))
    client = SchedulerClient([a.address, b.address], failover_timeout_s=10)
    try:
        started = asyncio.Event()

        async def on_event(tokens: list[int]) -> None:
            started.set()
        running = asyncio.create_task(generate(
            client, "running", SamplingFields(max_tokens=200, temperature=0.0, ignore_eos=True), on_event=on_event))
        await started.wait()
        draining = asyncio.create_task(a.servicer.drain())  # SIGTERM: refuse new work, finish the rest
        late = asyncio.create_task(generate(client, "late", GREEDY))
        tokens, last = await running
        assert len(tokens) == 200 and last.finish_reason == "length"  # never moved: it ran to its end
        await asyncio.wait_for(draining, 5)
        assert not late.done() and client.num_resubmissions >= 1  # refused by A, then by B standing by
        await a.kill()  # the rest of the shutdown: the lease goes to B
        tokens, last = await asyncio.wait_for(late, 10)
        assert len(tokens) == 48 and last.finish_reason == "length"
        assert b.leadership.fleet is not None and client.address == b.address
    finally:
        await client.close()
        await b.close()
        await a.close()


async def test_a_standby_first_in_the_list_is_skipped(tmp_path, workers) -> None:
    pool = PoolConfig("default", "v1", 1.0, (workers[0],))
    a, b = await leader_and_standby(tmp_path, (pool,))
    client = SchedulerClient([b.address, a.address], failover_timeout_s=10)
    try:
        tokens, last = await generate(client, "r1", GREEDY)
        assert len(tokens) == 48 and last.finish_reason == "length"
        assert client.address == a.address and client.num_resubmissions == 1  # the standby refused once
        tokens, last = await generate(client, "r2", GREEDY)
        assert len(tokens) == 48 and client.num_resubmissions == 1  # the leader's stream is kept
    finally:
        await client.close()
        await b.close()
        await a.close()


async def test_with_no_scheduler_leading_the_request_fails_unavailable_after_the_failover_timeout(tmp_path) -> None:
    hold_lease(tmp_path / "lease", ELSEWHERE)
    standbys = [await leased(tmp_path / "lease") for _ in range(2)]
    client = SchedulerClient([s.address for s in standbys], failover_timeout_s=0.5)
    try:
        started_s = time.monotonic()
        with pytest.raises(Unavailable) as failed:
            await generate(client, "r1", GREEDY)
        elapsed_s = time.monotonic() - started_s
        assert 0.5 <= elapsed_s < 3.0
        assert "no scheduler took the request for 0.5 s" in str(failed.value)
        assert ELSEWHERE in str(failed.value)  # the last refusal named the leader
        assert client.num_resubmissions >= 2  # both addresses were tried
    finally:
        await client.close()
        for s in standbys:
            await s.close()
