"""A deterministic fake model and a fake worker that executes StepPlans and checks them.

The fake model's next token is a function of the whole token history (a rolling hash), so a
greedy run has exactly one right answer, computable without any scheduler (`greedy_tokens`).
The fake worker keeps a fake KV cache: each slot stores the rolling hash of the history up to its
position, and the next token is read from the KV slot of the last position. Wrong block tables,
a reused prefix block with other contents, or a block overwritten while someone else still reads
it therefore change the output tokens, on top of the explicit plan checks below (each a test
failure via `PlanError`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from services.scheduler.batcher import Batcher, RequestEvent, RequestOutput, StepPlan
from services.scheduler.block_manager import BlockManager
from services.scheduler.request import FinishReason, Request
from services.scheduler.speculation import NgramProposer
from shared.sampling_rules import SamplingParams

VOCAB_SIZE = 64
_MOD = (1 << 61) - 1


class PlanError(AssertionError):
    """The scheduler sent a plan a real worker would refuse (or silently get wrong)."""


def extend_hash(history_hash: int, token_id: int) -> int:
    return (history_hash * 1_000_003 + token_id + 1) % _MOD


def next_token(history_hash: int, vocab_size: int = VOCAB_SIZE) -> int:
    return ((history_hash >> 17) ^ history_hash) % vocab_size


def history_hashes(token_ids: Iterable[int]) -> list[int]:
    hashes, h = [], 0
    for token_id in token_ids:
        h = extend_hash(h, token_id)
        hashes.append(h)
    return hashes


def greedy_tokens(prompt: Sequence[int], *, max_tokens: int, eos_token_ids: Iterable[int] = (),
                  stop_token_ids: Iterable[int] = (), ignore_eos: bool = False,
                  max_model_len: int = 1 << 30) -> tuple[list[int], FinishReason]:
    """What a correct scheduler must produce for this prompt, computed without one."""
    eos, stops = frozenset(eos_token_ids), frozenset(stop_token_ids)
    h = history_hashes(prompt)[-1]
    out: list[int] = []
    while True:
        token_id = next_token(h)
        out.append(token_id)
        h = extend_hash(h, token_id)
        if token_id in stops or (not ignore_eos and token_id in eos):
            return out, FinishReason.STOP
        if len(out) >= max_tokens or len(prompt) + len(out) >= max_model_len:
            return out, FinishReason.LENGTH


def make_request(request_id: str, prompt: Sequence[int], *, max_tokens: int = 8, priority: int = 0,
                 arrival_s: float = 0.0, deadline_s: float | None = None, cache_salt: str = "",
                 stop_token_ids: Iterable[int] = (), ignore_eos: bool = False) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt), sampling=SamplingParams(temperature=0.0),
                   max_tokens=max_tokens, stop_token_ids=frozenset(stop_token_ids), ignore_eos=ignore_eos,
                   priority=priority, arrival_s=arrival_s, deadline_s=deadline_s, cache_salt=cache_salt)


@dataclass
class _Held:
    token_ids: list[int]
    hashes: list[int]
    block_ids: list[int]
    num_computed_tokens: int


class FakeWorker:
    """Executes plans like services/worker/executor.py does, against a fake KV cache."""

    def __init__(self, num_blocks: int, block_size: int, *, max_model_len: int, max_num_batched_tokens: int,
                 max_num_seqs: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.fail_request_ids: set[str] = set()  # sampling these returns an error output
        self.reset()

    def reset(self) -> None:
        self.held: dict[str, _Held] = {}
        self.drafts: dict[str, tuple[int, ...]] = {}  # this step's draft tokens, by request
        self.num_accepted_tokens = 0  # drafts kept, all steps together
        self.failed: set[str] = set()  # their sampling failed: a step planned ahead skips them
        self.kv: dict[int, list[int | None]] = {}
        self.host_kv: dict[int, list[int | None]] = {}  # the host tier: copies only, never read by attention
        self.num_copies_to_host = self.num_copies_to_device = 0
        self.last_step_id = 0

    def execute(self, plan: StepPlan) -> list[RequestOutput]:
        self._check_header(plan)
        for rid in plan.finished_request_ids:
            if rid not in self.held:
                raise PlanError(f"step {plan.step_id}: finished id {rid!r} is not held")
            del self.held[rid]
            self.failed.discard(rid)
        self._copy(plan)
        scheduled: list[tuple[str, int]] = []
        for new in plan.new_requests:
            rid = new.request.request_id
            if rid in self.held:
                raise PlanError(f"step {plan.step_id}: new request {rid!r} is already held")
            tokens = new.request.all_token_ids
            held = _Held(tokens, history_hashes(tokens), list(new.block_ids), new.num_computed_tokens)
            self.held[rid] = held
            self._check_table(rid, held)
            for pos in range(new.num_computed_tokens):  # prefix hits must hold exactly this history
                if self._slot(held, pos) != held.hashes[pos]:
                    raise PlanError(f"{rid!r}: cached block for position {pos} holds another history")
            scheduled.append((rid, new.num_scheduled_tokens))
        for cached in plan.cached_requests:
            held = self.held.get(cached.request_id)
            if held is None:
                raise PlanError(f"step {plan.step_id}: cached request {cached.request_id!r} is not held")
            if cached.request_id in self.failed:
                continue
            if cached.num_computed_tokens != held.num_computed_tokens:
                raise PlanError(f"{cached.request_id!r}: plan says {cached.num_computed_tokens} computed, "
                                f"worker has {held.num_computed_tokens}")
            held.block_ids.extend(cached.new_block_ids)
            self._check_table(cached.request_id, held)
            if cached.draft_token_ids:
                self._take_drafts(cached.request_id, held, cached.draft_token_ids, cached.num_scheduled_tokens)
            scheduled.append((cached.request_id, cached.num_scheduled_tokens))
        if len(self.held) > self.max_num_seqs:
            raise PlanError(f"worker holds {len(self.held)} requests > max_num_seqs {self.max_num_seqs}")
        owners = self._owners()
        return [out for rid, n in scheduled if (out := self._run(rid, n, owners)) is not None]

    def _take_drafts(self, rid: str, held: _Held, drafts: tuple[int, ...], num_scheduled: int) -> None:
        """Drafts follow the last token for this step only, as in services/worker/executor.py."""
        if held.num_computed_tokens + num_scheduled != len(held.token_ids) + len(drafts):
            raise PlanError(f"{rid!r}: {len(drafts)} drafts but {num_scheduled} tokens scheduled after "
                            f"{held.num_computed_tokens} of {len(held.token_ids)}")
        self.drafts[rid] = drafts
        for token_id in drafts:
            held.token_ids.append(token_id)
            held.hashes.append(extend_hash(held.hashes[-1], token_id))

    def _verify(self, rid: str, held: _Held) -> RequestOutput:
        """Greedy verification: keep the model's tokens up to the first that differs from its draft,
        then drop the rest of the drafts and the blocks past the kept tokens (the executor's rule)."""
        drafts = self.drafts.pop(rid)
        base = len(held.token_ids) - len(drafts)  # tokens before the drafts
        kept: list[int] = []
        for j in range(len(drafts) + 1):
            slot = self._slot(held, base - 1 + j)
            assert slot is not None
            kept.append(next_token(slot))
            if j == len(drafts) or kept[-1] != drafts[j]:
                break
        self.num_accepted_tokens += len(kept) - 1
        del held.token_ids[base:], held.hashes[base:]
        for token_id in kept:
            held.token_ids.append(token_id)
            held.hashes.append(extend_hash(held.hashes[-1], token_id))
        held.num_computed_tokens = base - 1 + len(kept)
        del held.block_ids[-(-held.num_computed_tokens // self.block_size):]
        return RequestOutput(rid, tuple(kept))

    def _check_header(self, plan: StepPlan) -> None:
        if plan.step_id <= self.last_step_id:
            raise PlanError(f"step id {plan.step_id} after {self.last_step_id}")
        self.last_step_id = plan.step_id
        ids = [n.request.request_id for n in plan.new_requests] + [c.request_id for c in plan.cached_requests]
        if len(set(ids)) != len(ids):
            raise PlanError(f"step {plan.step_id}: a request is scheduled twice: {ids}")
        if len(set(plan.finished_request_ids)) != len(plan.finished_request_ids):
            raise PlanError(f"step {plan.step_id}: duplicate finished ids {plan.finished_request_ids}")
        if plan.num_scheduled_tokens > self.max_num_batched_tokens:
            raise PlanError(f"step {plan.step_id}: {plan.num_scheduled_tokens} tokens over the budget")

    def _copy(self, plan: StepPlan) -> None:
        """The executor's order: every copy down, then every copy up, before the forward pass. A
        copy of a block that never held K/V, or into a block a held request still reads, is a bug."""
        for device_id, host_id in plan.copies_to_host:
            if device_id not in self.kv:
                raise PlanError(f"step {plan.step_id}: copies device block {device_id} down, which holds nothing")
            self.host_kv[host_id] = list(self.kv[device_id])
        self.num_copies_to_host += len(plan.copies_to_host)
        read = {b for rid, held in self.held.items() for b in held.block_ids}
        for host_id, device_id in plan.copies_to_device:
            if host_id not in self.host_kv:
                raise PlanError(f"step {plan.step_id}: copies host block {host_id} up, which holds nothing")
            if device_id in read:
                raise PlanError(f"step {plan.step_id}: copies up into device block {device_id}, held before this step")
            self.kv[device_id] = list(self.host_kv[host_id])
        self.num_copies_to_device += len(plan.copies_to_device)

    def _check_table(self, rid: str, held: _Held) -> None:
        if len(set(held.block_ids)) != len(held.block_ids):
            raise PlanError(f"{rid!r}: duplicate block ids {held.block_ids}")
        if not all(0 < b < self.num_blocks for b in held.block_ids):
            raise PlanError(f"{rid!r}: block ids outside [1, {self.num_blocks}): {held.block_ids}")

    def _owners(self) -> dict[int, list[str]]:
        owners: dict[int, list[str]] = {}
        for rid, held in self.held.items():
            for index, block_id in enumerate(held.block_ids):
                owners.setdefault(block_id, []).append(rid)
                # Sharing is only legal for full, computed (hence read-only) prefix blocks.
                if len(owners[block_id]) > 1:
                    for other in owners[block_id]:
                        other_held = self.held[other]
                        other_index = other_held.block_ids.index(block_id)
                        if (other_index + 1) * self.block_size > other_held.num_computed_tokens:
                            raise PlanError(f"block {block_id} shared by {owners[block_id]} but not a full "
                                            f"computed block of {other!r}")
        return owners

    def _slot(self, held: _Held, pos: int) -> int | None:
        block = self.kv.get(held.block_ids[pos // self.block_size])
        return None if block is None else block[pos % self.block_size]

    def _run(self, rid: str, num_scheduled: int, owners: dict[int, list[str]]) -> RequestOutput | None:
        held = self.held[rid]
        start, end = held.num_computed_tokens, held.num_computed_tokens + num_scheduled
        if num_scheduled < 1:
            raise PlanError(f"{rid!r}: scheduled {num_scheduled} tokens")
        if end > len(held.token_ids):
            raise PlanError(f"{rid!r}: computes up to {end} but has {len(held.token_ids)} tokens")
        if end > self.max_model_len:
            raise PlanError(f"{rid!r}: computes past max_model_len")
        if len(held.block_ids) * self.block_size < end:
            raise PlanError(f"{rid!r}: {len(held.block_ids)} blocks cannot hold {end} tokens")
        for pos in range(start, end):
            block_id = held.block_ids[pos // self.block_size]
            if owners[block_id] != [rid]:
                raise PlanError(f"{rid!r} writes block {block_id} also held by {owners[block_id]}")
            if pos > 0 and self._slot(held, pos - 1) != held.hashes[pos - 1]:
                raise PlanError(f"{rid!r}: K/V before position {pos} is not this request's history")
            self.kv.setdefault(block_id, [None] * self.block_size)[pos % self.block_size] = held.hashes[pos]
        held.num_computed_tokens = end
        if end < len(held.token_ids):
            return None
        if rid in self.fail_request_ids:
            self.failed.add(rid)
            return RequestOutput(rid, (), (), error="sampler failed")
        if rid in self.drafts:
            return self._verify(rid, held)
        last = self._slot(held, end - 1)
        assert last is not None
        token_id = next_token(last)
        held.token_ids.append(token_id)
        held.hashes.append(extend_hash(held.hashes[-1], token_id))
        return RequestOutput(rid, (token_id,))


def make_pair(num_blocks: int = 64, block_size: int = 4, *, max_model_len: int = 256,
              max_num_batched_tokens: int = 64, max_num_seqs: int = 16, eos_token_ids: Sequence[int] = (),
              enable_prefix_caching: bool = True, num_host_blocks: int = 0,
              batch_wait_ms: float = 0.0, eviction: str = "lru",
              num_speculative_tokens: int = 0) -> tuple[Batcher, FakeWorker]:
    manager = BlockManager(num_blocks, block_size, "v1", enable_prefix_caching, num_host_blocks, eviction)
    batcher = Batcher(manager, max_model_len=max_model_len, eos_token_ids=eos_token_ids,
                      max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                      batch_wait_ms=batch_wait_ms,
                      proposer=NgramProposer(num_speculative_tokens) if num_speculative_tokens else None)
    worker = FakeWorker(num_blocks, block_size, max_model_len=max_model_len,
                        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    return batcher, worker


def lookahead_steps(batcher: Batcher, worker: FakeWorker) -> Iterator[list[RequestEvent]]:
    """The service loop with async scheduling, as services/scheduler/worker_loop.py runs it: up to
    two steps in flight, the next planned before the oldest is answered. The fake worker executes a
    plan when it is sent; the batcher sees the outputs only at `update`. Yields each update's events."""
    in_flight: deque[tuple[StepPlan, list[RequestOutput]]] = deque()
    while batcher.has_work() or in_flight:
        can_plan = len(in_flight) < 2 and not (in_flight and batcher.short_of_blocks)
        plan = batcher.schedule(lookahead=bool(in_flight)) if can_plan else None
        if plan is not None and not plan.is_empty:
            in_flight.append((plan, worker.execute(plan)))
            if len(in_flight) < 2:
                continue
        if not in_flight:
            raise AssertionError("work is left but nothing can be scheduled")
        yield batcher.update(*in_flight.popleft())


def step(batcher: Batcher, worker: FakeWorker) -> tuple[StepPlan, list[RequestEvent]]:
    """One iteration of the service loop: schedule, execute, update."""
    plan = batcher.schedule()
    return plan, batcher.update(plan, worker.execute(plan))


def run_until_idle(batcher: Batcher, worker: FakeWorker, max_steps: int = 10_000) -> list[StepPlan]:
    plans = []
    for _ in range(max_steps):
        if not batcher.has_work():
            return plans
        plans.append(step(batcher, worker)[0])
    raise AssertionError(f"still busy after {max_steps} steps")
