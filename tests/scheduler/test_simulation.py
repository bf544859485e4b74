"""Randomised simulations of the scheduler's pure core: Batcher + BlockManager + fake worker.

Unit tests pin each rule; this file looks for what the rules miss when they interact: arrivals
with shared prefixes and salts, aborts (also while a step is in flight), deadlines, worker errors,
priorities, a dead worker, and a KV pool small enough that preemption is routine. The fake worker
refuses any inconsistent plan, the block accounting is checked after every step, and since the
fake model is deterministic every request that was not aborted must end with exactly the tokens of
a run with a huge pool (no preemption at all) and of the scheduler-free oracle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from collections import deque

from services.scheduler.batcher import Batcher, RequestOutput, StepPlan
from services.scheduler.request import ErrorKind, FinishReason, Request, RequestStatus
from tests.scheduler.fakes import VOCAB_SIZE, greedy_tokens, make_pair, make_request

EOS_TOKEN_IDS = (0,)
MAX_MODEL_LEN = 128


@dataclass(frozen=True)
class Arrival:
    step: int
    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    priority: int
    cache_salt: str
    ignore_eos: bool
    stop_token_ids: frozenset[int]
    deadline_step: int | None  # absolute, in steps (the simulation's clock)
    abort_step: int | None
    abort_in_flight: bool  # abort between schedule() and update() rather than before schedule()
    worker_error: bool

    def request(self) -> Request:
        return make_request(self.request_id, self.prompt, max_tokens=self.max_tokens, priority=self.priority,
                            arrival_s=float(self.step), cache_salt=self.cache_salt, ignore_eos=self.ignore_eos,
                            stop_token_ids=self.stop_token_ids,
                            deadline_s=None if self.deadline_step is None else float(self.deadline_step))


@dataclass(frozen=True)
class Config:
    seed: int
    num_requests: int
    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    enable_prefix_caching: bool = True
    num_host_blocks: int = 0  # a host tier (L2) under the device pool
    eviction: str = "lru"


def make_workload(config: Config) -> list[Arrival]:
    rng = random.Random(config.seed)
    prefixes = [tuple(rng.randrange(VOCAB_SIZE) for _ in range(rng.randrange(4, 40))) for _ in range(6)]
    arrivals, step = [], 0
    for i in range(config.num_requests):
        step += rng.choice((0, 0, 1, 1, 2, 4))
        shared = rng.choice(prefixes) if rng.random() < 0.75 else ()
        prompt = shared + tuple(rng.randrange(VOCAB_SIZE) for _ in range(rng.randrange(0 if shared else 1, 30)))
        max_tokens = rng.randrange(1, 40)
        worst = min(len(prompt) + max_tokens, MAX_MODEL_LEN) - 1
        assert -(-worst // config.block_size) <= config.num_blocks - 1, "the pool must fit any one request"
        arrivals.append(Arrival(
            step=step, request_id=f"s{config.seed}-r{i}", prompt=prompt, max_tokens=max_tokens,
            priority=rng.choice((0, 0, 0, 1, 2)), cache_salt=rng.choice(("", "", "a", "b")),
            ignore_eos=rng.random() < 0.3,
            stop_token_ids=frozenset({rng.randrange(VOCAB_SIZE)}) if rng.random() < 0.2 else frozenset(),
            deadline_step=step + rng.randrange(1, 60) if rng.random() < 0.1 else None,
            abort_step=step + rng.randrange(0, 40) if rng.random() < 0.1 else None,
            abort_in_flight=rng.random() < 0.5,
            worker_error=rng.random() < 0.03,
        ))
    return arrivals


def check_blocks(batcher: Batcher, requests: dict[str, Request]) -> None:
    manager = batcher.block_manager
    assert (manager.num_blocks_free + manager.num_blocks_cached + manager.num_blocks_used
            == manager.num_blocks_total)
    referenced: set[int] = set()
    for rid, request in requests.items():
        block_ids = manager.block_ids(rid)
        if batcher.get(rid) is None or request.status is RequestStatus.WAITING:
            assert block_ids == [], f"{rid} holds blocks while {request.status}"
            continue
        assert len(block_ids) * manager.block_size >= request.num_computed_tokens
        assert request.num_computed_tokens <= request.num_tokens + request.num_output_placeholders
        referenced.update(block_ids)
    # "used" means referenced by a live request, no more and no less.
    assert len(referenced) == manager.num_blocks_used
    if manager.host is not None:  # host blocks are pinned only while a plan is built
        host = manager.host
        assert host.num_blocks_used == 0
        assert host.num_blocks_free + host.num_blocks_cached == host.num_blocks_total


@dataclass
class Outcome:
    requests: dict[str, Request]
    num_steps: int
    num_preemptions: int
    num_cached_tokens: int  # at first placements (what usage reports)
    num_hit_tokens: int  # prefix-cache hits over all placements, re-placements after preemption included
    num_take_all: int
    num_decodes_ahead: int  # decodes planned on a token still in flight (lookahead only)
    num_copies_to_device: int = 0  # host-tier hits copied back up


def simulate(config: Config, arrivals: list[Arrival], *, chaos: bool, lookahead: bool = False) -> Outcome:
    """Runs the workload to the end; `chaos` adds aborts, deadlines, worker errors and a dead worker.
    With `lookahead` it runs like the worker loop with async scheduling: up to two steps in flight,
    the next planned before the oldest is answered (the fake worker executes a plan when it is sent)."""
    batcher, worker = make_pair(config.num_blocks, config.block_size, max_model_len=MAX_MODEL_LEN,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                max_num_seqs=config.max_num_seqs, eos_token_ids=EOS_TOKEN_IDS,
                                enable_prefix_caching=config.enable_prefix_caching,
                                num_host_blocks=config.num_host_blocks, eviction=config.eviction)
    rng = random.Random(config.seed + 1)
    requests: dict[str, Request] = {}
    pending = list(arrivals)
    take_all_step = rng.randrange(20, 200) if chaos else -1
    num_take_all = num_hit_tokens = num_decodes_ahead = 0
    if chaos:
        worker.fail_request_ids = {a.request_id for a in arrivals if a.worker_error}
    in_flight: deque[tuple[StepPlan, list[RequestOutput]]] = deque()
    step = 0
    while pending or batcher.has_work() or in_flight:
        while pending and pending[0].step <= step:
            arrival = pending.pop(0)
            requests[arrival.request_id] = arrival.request()
            batcher.add(requests[arrival.request_id])
        in_flight_aborts = []
        if chaos:
            for arrival in arrivals:
                if arrival.abort_step == step and arrival.request_id in requests:
                    if arrival.abort_in_flight:
                        in_flight_aborts.append(arrival.request_id)
                    else:
                        batcher.abort(arrival.request_id)
            for event in batcher.expire(float(step)):
                assert event.finish_reason is FinishReason.ABORT and event.error.kind is ErrorKind.DEADLINE
        if step == take_all_step:  # the worker died; its requests come back to a restarted one
            worker.reset()
            in_flight.clear()  # their replies are lost with the worker
            taken = batcher.take_all()
            assert batcher.block_manager.num_blocks_used == 0
            assert all(r.num_computed_tokens == 0 for r in taken)
            for request in taken:
                batcher.add(request)
            num_take_all += 1
        can_plan = len(in_flight) < 1 + lookahead and not (in_flight and batcher.short_of_blocks)
        plan = batcher.schedule(lookahead=bool(in_flight)) if can_plan else None
        if plan is not None:
            num_hit_tokens += sum(n.num_computed_tokens for n in plan.new_requests)
            num_decodes_ahead += sum(c.num_computed_tokens == c.request.num_tokens for c in plan.cached_requests)
            for rid in in_flight_aborts:
                batcher.abort(rid)
            if not (lookahead and plan.is_empty):
                in_flight.append((plan, worker.execute(plan)))
        # With lookahead, answer the oldest step only once the next is planned (or cannot be).
        if in_flight and (len(in_flight) > lookahead or plan is None or plan.is_empty):
            for event in batcher.update(*in_flight.popleft()):
                assert requests[event.request_id].status in (RequestStatus.RUNNING, RequestStatus.FINISHED)
        check_blocks(batcher, requests)
        step += 1
        assert step < 50_000, "the simulation does not converge"
    assert batcher.block_manager.num_blocks_used == 0
    assert worker.held == {}, "the worker still holds requests the scheduler forgot"
    assert all(r.status is RequestStatus.FINISHED for r in requests.values())
    return Outcome(requests, step, sum(r.num_preemptions for r in requests.values()),
                   sum(r.num_cached_tokens for r in requests.values()), num_hit_tokens, num_take_all,
                   num_decodes_ahead, worker.num_copies_to_device)


CONFIGS = [
    Config(seed=1, num_requests=300, block_size=4, num_blocks=40, max_num_batched_tokens=32, max_num_seqs=12),
    Config(seed=2, num_requests=300, block_size=2, num_blocks=70, max_num_batched_tokens=48, max_num_seqs=16),
    Config(seed=3, num_requests=300, block_size=8, num_blocks=20, max_num_batched_tokens=24, max_num_seqs=8),
    Config(seed=4, num_requests=300, block_size=4, num_blocks=36, max_num_batched_tokens=64, max_num_seqs=32),
    Config(seed=5, num_requests=300, block_size=1, num_blocks=130, max_num_batched_tokens=16, max_num_seqs=6),
    Config(seed=6, num_requests=300, block_size=4, num_blocks=40, max_num_batched_tokens=32, max_num_seqs=12,
           enable_prefix_caching=False),
    Config(seed=7, num_requests=300, block_size=16, num_blocks=10, max_num_batched_tokens=40, max_num_seqs=4),
    Config(seed=8, num_requests=300, block_size=4, num_blocks=60, max_num_batched_tokens=8, max_num_seqs=64),
    # A small device pool over a large host tier: most prefixes come back from L2.
    Config(seed=9, num_requests=300, block_size=4, num_blocks=30, max_num_batched_tokens=32, max_num_seqs=8,
           num_host_blocks=200),
    # A host tier smaller than the device pool: it evicts too, and copies down may find no room.
    Config(seed=10, num_requests=300, block_size=2, num_blocks=70, max_num_batched_tokens=48, max_num_seqs=16,
           num_host_blocks=12),
    Config(seed=11, num_requests=300, block_size=4, num_blocks=40, max_num_batched_tokens=32, max_num_seqs=12,
           eviction="lfu"),
    Config(seed=12, num_requests=300, block_size=4, num_blocks=30, max_num_batched_tokens=32, max_num_seqs=8,
           num_host_blocks=60, eviction="lfu"),
]
TOTALS: dict[str, int] = {}


@pytest.mark.parametrize("lookahead", [False, True], ids=["sync", "lookahead"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"seed{c.seed}")
def test_random_workload_is_consistent_and_matches_a_preemption_free_run(config: Config, lookahead: bool) -> None:
    arrivals = make_workload(config)
    outcome = simulate(config, arrivals, chaos=True, lookahead=lookahead)
    big = Config(config.seed, config.num_requests, config.block_size, num_blocks=10_000,
                 max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=10_000)
    reference = simulate(big, arrivals, chaos=False)
    assert reference.num_preemptions == 0
    assert outcome.num_preemptions > 0, "the pool was meant to be small enough to force preemptions"
    assert outcome.num_take_all == 1
    assert (outcome.num_decodes_ahead > 0) is lookahead
    if config.enable_prefix_caching:
        assert outcome.num_cached_tokens > 0 and outcome.num_hit_tokens > 0
    assert (outcome.num_copies_to_device > 0) is (config.num_host_blocks > 0)
    num_compared = 0
    for arrival in arrivals:
        request = outcome.requests[arrival.request_id]
        if request.finish_reason is FinishReason.ABORT:
            continue
        ref = reference.requests[arrival.request_id]
        oracle, reason = greedy_tokens(arrival.prompt, max_tokens=arrival.max_tokens, eos_token_ids=EOS_TOKEN_IDS,
                                       stop_token_ids=arrival.stop_token_ids, ignore_eos=arrival.ignore_eos,
                                       max_model_len=MAX_MODEL_LEN)
        assert request.output_token_ids == ref.output_token_ids == oracle, arrival.request_id
        assert request.finish_reason is ref.finish_reason is reason
        num_compared += 1
    assert num_compared > config.num_requests // 2
    for key, value in (("steps", outcome.num_steps), ("preemptions", outcome.num_preemptions),
                       ("compared", num_compared), ("cached_tokens", outcome.num_cached_tokens),
                       ("hit_tokens", outcome.num_hit_tokens),
                       ("reference_steps", reference.num_steps)):
        TOTALS[key] = TOTALS.get(key, 0) + value
    print(f"seed {config.seed}: {outcome.num_steps} steps, {outcome.num_preemptions} preemptions, "
          f"{num_compared} compared, {outcome.num_cached_tokens} cached / {outcome.num_hit_tokens} hit tokens; "
          f"totals {TOTALS}")  # visible with -s: the numbers behind "preemptions actually happened"
