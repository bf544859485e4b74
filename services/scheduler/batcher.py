"""Builds one worker's batches: which requests run in the next step, with how many tokens and blocks.

Continuous batching with chunked prefill. Every request has `num_computed_tokens` that catches up
to `num_tokens`; there is no separate prefill or decode phase, so a step can mix decodes, prompt
chunks and newly admitted requests under one token budget. Running decodes are scheduled first
because each is a single token and a stalled decode is a visible stall in someone's stream; prompt
chunks then take whatever budget is left. When the KV pool runs out, a running request is
preempted (lowest priority, newest arrival) and later recomputed from scratch — recompute rather
than swap keeps the worker stateless about preemption, and with prefix caching most of the prefix
usually comes back from the cache anyway.

The batcher also answers the router's one question about this worker, `overlap(request)`:
how much of a prompt this worker would not compute again, and how much of that comes from the
host tier (a copy, not free). That is the longest full-block prefix either cached here or
promised here: a prompt routed to this worker but not yet computed
(`_pending`, from `add` until its first token, or until it leaves) counts, so a burst of requests
on a new prefix follows the first one instead of spreading over the pool before anything is cached.

A prompt whose next uncached block is being computed right now by another running request on
this worker waits for it instead of computing it a second time (`_computing`): a burst of requests
on a new prefix then pays for the prefix once, and the others start a step or two later as cache
hits. The wait is bounded: the owner is running, and its keys are dropped when its prompt is done
or it leaves (finish, abort, preemption), after which the waiter computes whatever is still missing.

The Batcher is the scheduler's only view of what the worker holds. Sends are deltas: a request is
sent in full once (`ScheduledNew`) and then only as counts and new block ids (`ScheduledCached`);
whenever the worker must forget a request (finished, aborted, preempted) its id travels in the next
plan's `finished_request_ids`, exactly once.

`num_computed_tokens` advances when a step is planned, not when its result arrives: the worker
computes exactly what was planned or the step fails whole (and the worker is reset via
`take_all`), so the two views agree, and a `schedule()` made before the previous `update()` can
never schedule the same tokens twice.

Async scheduling: `schedule(lookahead=True)` plans step N+1 while step N is still on the worker,
so the worker never waits for the scheduler. A request whose step N samples a token counts it as
a placeholder (`num_output_placeholders`); step N+1 then decodes that token, which only the
worker knows yet (it keeps each request's tokens), and `update()` for step N fills it in. The
price is one wasted token when step N's token turns out to be a stop: the request is released at
`update()`, and what step N+1 computed for it is dropped. `max_tokens` and `max_model_len` are
known ahead, so no step is planned past them. A lookahead plan never preempts (that would throw
away a token already in flight): when the pool runs short it schedules what fits and sets
`short_of_blocks`, and the caller plans the next step only after the steps in flight are answered.

Knobs (constructor arguments; nothing is read from the environment):
- `max_model_len` — the model's context length; a request stops with LENGTH when it reaches it.
- `eos_token_ids` — a sampled id from this set stops a request (STOP) unless it set `ignore_eos`.
- `max_num_batched_tokens` (default 2048) — token budget of one step, all requests together.
- `max_num_seqs` (default 128) — most requests running (holding blocks on the worker) at once.
- `batch_wait_ms` (default 0) — how long an idle worker's first step may wait for company
  (`hold_until_s`; the rule is in batch_wait.py). 0 never waits.
- `proposer` (default None: off) — prompt-lookup speculative decoding (speculation.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from services.scheduler.batch_wait import BatchWait
from services.scheduler.block_manager import BlockManager
from services.scheduler.prefix_claims import PrefixClaims
from services.scheduler.plan import (
    RequestEvent,
    RequestOutput,
    ScheduledCached,
    ScheduledNew,
    StepPlan,
)
from services.scheduler.request import ErrorKind, FinishReason, Request, RequestError, RequestStatus
from services.scheduler.speculation import NgramProposer, Speculation
from shared.errors import InvalidArgument

__all__ = [
    "Batcher",
    "RequestEvent",
    "RequestOutput",
    "ScheduledCached",
    "ScheduledNew",
    "StepPlan",
]

DEADLINE_ERROR = RequestError(ErrorKind.DEADLINE, "deadline exceeded")
NO_TOKEN_ERROR = RequestError(ErrorKind.FAILED, "worker returned no token for a request that completed its chunk")

# (-priority, arrival_s, insertion seq): smallest is served first, largest is preempted first.
_OrderKey = tuple[int, float, int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Batcher:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_model_len: int,
        eos_token_ids: Sequence[int],
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 128,
        batch_wait_ms: float = 0.0,
        proposer: NgramProposer | None = None,
    ) -> None:
        for name, value, low in (("max_model_len", max_model_len, 2),
                                 ("max_num_batched_tokens", max_num_batched_tokens, 1),
                                 ("max_num_seqs", max_num_seqs, 1)):
            if value < low:
                raise InvalidArgument(f"must be >= {low}, got {value}", field=name)
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.batch_wait = BatchWait(batch_wait_ms)
        self.speculation = Speculation(proposer, block_manager, max_model_len) if proposer is not None else None
        self._requests: dict[str, Request] = {}  # every live request, waiting or running
        self._keys: dict[str, _OrderKey] = {}
        self._waiting: list[tuple[_OrderKey, str]] = []  # sorted; small enough that bisect beats a heap
        self._running: dict[str, Request] = {}
        self._on_worker: set[str] = set()  # ids the worker holds state for
        self._finished_ids: dict[str, None] = {}  # insertion-ordered set for the next plan
        # Prefix-index keys of prompt blocks a running request is computing but has not yet published.
        self._computing = PrefixClaims()
        self._waiting_on: dict[str, bytes] = {}  # waiter -> the key it waits for (saves re-hashing)
        # Prompt block keys promised to this worker (routed, first token not yet out).
        self._pending = PrefixClaims()
        self._next_seq = 0
        self._next_step_id = 1  # 0 reads as "unset" on the wire
        self.short_of_blocks = False  # the last lookahead plan left a request out for want of blocks

    # --- queries -----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_queued_prefill_tokens(self) -> int:
        """Prompt work still ahead, for the router's load term: tokens not yet computed, less what
        a request not yet placed is expected to find in the prefix cache. Counting the whole
        prompt of queued requests would make a worker holding a popular prefix look busy exactly
        because it attracts the requests that share it."""
        total = 0
        for r in self._requests.values():
            remaining = max(r.num_tokens - r.num_computed_tokens, 0)  # < 0 with a decode planned ahead
            if r.num_computed_tokens == 0:
                remaining -= min(r.num_expected_cached_tokens, max(remaining - 1, 0))
            total += remaining
        return total

    @property
    def num_running_decode_requests(self) -> int:
        return sum(1 for r in self._running.values() if r.num_tokens - r.num_computed_tokens <= 1)

    def overlap_tokens(self, request: Request) -> int:
        """Tokens of the request's longest full-block prefix this worker has cached in its device
        pool or will have (a prompt placed here and not yet computed): the router's cache-affinity
        measure. Exact, takes no refs, changes nothing."""
        return self.overlap(request)[0]

    def overlap(self, request: Request) -> tuple[int, int]:
        """(`overlap_tokens`, host-tier tokens continuing that prefix): what the router weighs as
        free and as a copy. Exact, takes no refs, changes nothing."""
        manager = self.block_manager
        token_ids = request.all_token_ids
        if not self._pending and manager.host is None:  # the index alone: hashes only as far as it matches
            return manager.num_cached_prefix_tokens(token_ids, request.cache_salt), 0
        keys = manager.block_keys(token_ids, request.cache_salt)
        num_blocks = len(manager.lookup_prefix(token_ids, request.cache_salt, keys))
        num_host_blocks = len(manager.lookup_host_prefix(token_ids, request.cache_salt, keys, num_blocks))
        num_device_blocks = max(num_blocks, self._pending.prefix_length(keys))
        num_host_blocks = max(0, num_blocks + num_host_blocks - num_device_blocks)  # promised counts first
        return num_device_blocks * manager.block_size, num_host_blocks * manager.block_size

    def _promise(self, request: Request) -> None:
        if request.output_token_ids or self._pending.holds(request.request_id):
            return  # a moved request's prompt is no new promise: it was computed somewhere
        self._pending.claim(request.request_id,
                            self.block_manager.block_keys(request.prompt_token_ids, request.cache_salt))

    def _keep_promise(self, request_id: str) -> None:
        """Its prompt is computed (its blocks are in the index now) or it left."""
        self._pending.release(request_id)

    def has_work(self) -> bool:
        return bool(self._requests or self._finished_ids)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # --- requests in and out -----------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queues a request (new, or moved here from a dead worker with its output so far)."""
        rid = request.request_id
        if rid in self._requests:
            raise InvalidArgument(f"request {rid!r} is already queued on this worker", field="request_id")
        if not request.prompt_token_ids:
            raise InvalidArgument("must not be empty", field="prompt_token_ids")
        if request.max_tokens < 1:
            raise InvalidArgument(f"must be >= 1, got {request.max_tokens}", field="sampling.max_tokens")
        if request.num_tokens >= self.max_model_len:
            raise InvalidArgument(
                f"{request.num_tokens} tokens leave no room to generate within max_model_len "
                f"{self.max_model_len}", field="prompt_token_ids")
        # A request that cannot fit the pool even alone would preempt itself forever.
        final_tokens = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
        num_blocks = _cdiv(final_tokens - 1, self.block_manager.block_size)
        if num_blocks > self.block_manager.num_blocks_total:
            raise InvalidArgument(
                f"prompt + max_tokens needs {num_blocks} KV blocks; the worker has "
                f"{self.block_manager.num_blocks_total}", field="sampling.max_tokens")
        request.status = RequestStatus.WAITING
        request.finish_reason = None
        request.num_computed_tokens = 0
        request.num_output_placeholders = request.num_draft_tokens = 0  # in flight on a worker it left: lost
        self._requests[rid] = request
        self._keys[rid] = (-request.priority, request.arrival_s, self._next_seq)
        self._next_seq += 1
        bisect.insort(self._waiting, (self._keys[rid], rid))
        self._promise(request)

    def abort(self, request_id: str) -> Request | None:
        request = self._requests.get(request_id)
        if request is None:
            return None
        self._release(request, FinishReason.ABORT)
        return request

    def expire(self, now_s: float) -> list[RequestEvent]:
        expired = [r for r in self._requests.values() if r.deadline_s is not None and now_s >= r.deadline_s]
        for request in expired:
            self._release(request, FinishReason.ABORT)
        return [RequestEvent(r.request_id, (), (), FinishReason.ABORT, DEADLINE_ERROR) for r in expired]

    def take_all(self) -> list[Request]:
        """The worker died: hands back every live request, ready to be added elsewhere."""
        requests = sorted(self._requests.values(), key=lambda r: self._keys[r.request_id])
        for request in requests:
            request.status = RequestStatus.WAITING
            request.num_computed_tokens = 0
        self._requests.clear()
        self._keys.clear()
        self._waiting.clear()
        self._running.clear()
        self._on_worker.clear()
        self._finished_ids.clear()  # a restarted worker holds nothing to drop
        self._computing.clear()
        self._waiting_on.clear()
        self._pending.clear()
        self.block_manager.reset()
        return requests

    def take_waiting(self) -> list[Request]:
        """The worker is draining: hands back the queued requests (they hold no blocks) for another
        worker, and keeps the running ones, which finish here."""
        taken = []
        for _, rid in self._waiting:
            request = self._requests.pop(rid)
            del self._keys[rid]
            self._waiting_on.pop(rid, None)
            self._keep_promise(rid)
            taken.append(request)
        self._waiting.clear()
        return taken

    # --- one step ----------------------------------------------------------------------------
    def hold_until_s(self, now_s: float, *, lookahead: bool = False) -> float | None:
        """Until when the next step should wait for more arrivals (None: plan it now). Only an idle
        worker waits: nothing running and, `lookahead` False, no step in flight (batch_wait.py)."""
        if not self.batch_wait.wait_ms or lookahead or self._running or not self._waiting:
            return None
        waiting = [self._requests[rid] for _, rid in self._waiting]
        full = len(waiting) >= self.max_num_seqs or self.num_queued_prefill_tokens >= self.max_num_batched_tokens
        return self.batch_wait.hold_until_s(now_s, waiting, full=full)

    def schedule(self, *, lookahead: bool = False) -> StepPlan:
        """The next step. With `lookahead`, steps planned earlier may still be unanswered: a request
        they sample for is decoded once more on the token they will return (see the module doc)."""
        budget = self.max_num_batched_tokens
        scheduled: dict[str, ScheduledNew | ScheduledCached] = {}
        num_preemptions = 0
        self.short_of_blocks = False
        wanted = {rid: self._num_wanted(r, lookahead) for rid, r in self._running.items()}
        # Decodes first: one token each, and a stalled decode stalls a stream the client watches.
        order = sorted(self._running.values(), key=lambda r: (wanted[r.request_id] > 1, self._keys[r.request_id]))
        for request in order:
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            rid = request.request_id
            num_new = min(wanted[rid], budget)
            if num_new <= 0:
                continue
            added = self.block_manager.allocate_slots(rid, request.num_computed_tokens + num_new)
            if added is None and lookahead:
                self.short_of_blocks = True  # the others still run; the next plan waits and may preempt
                continue
            while added is None:
                victim = max(self._running.values(), key=lambda r: self._keys[r.request_id])
                budget += self._preempt(victim, scheduled)
                num_preemptions += 1
                if victim is request:
                    break
                added = self.block_manager.allocate_slots(rid, request.num_computed_tokens + num_new)
            if added is None:
                continue
            scheduled[rid] = ScheduledCached(rid, tuple(added), request.num_computed_tokens, num_new, request)
            request.num_computed_tokens += num_new
            self._count_placeholder(request)
            budget -= num_new
        # After a preemption the pool is known to be short; admitting now would only thrash.
        if not num_preemptions and not self.short_of_blocks:
            budget = self._admit(budget, scheduled)
            if self.speculation is not None:  # last: drafts take only budget and blocks nobody else wants
                self.speculation.add_drafts(scheduled, budget)
        return self._make_plan(scheduled, num_preemptions)

    def _num_wanted(self, request: Request, lookahead: bool) -> int:
        """Tokens the request could compute in the next step."""
        num_placeholders = request.num_output_placeholders
        if num_placeholders and (
                not lookahead
                or request.num_draft_tokens  # its step ends at one of k+1 positions (speculation.py)
                or (self.speculation is not None and self.speculation.may_draft_next(request))
                or len(request.output_token_ids) + num_placeholders >= request.max_tokens
                or request.num_tokens + num_placeholders >= self.max_model_len):
            return 0  # waits for the step in flight, or the token in flight is its last
        return request.num_tokens + num_placeholders - request.num_computed_tokens

    @staticmethod
    def _count_placeholder(request: Request) -> None:
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1  # this step samples a token only the worker will know

    def _admit(self, budget: int, scheduled: dict[str, ScheduledNew | ScheduledCached]) -> int:
        block_size = self.block_manager.block_size
        position = 0  # requests before it in the queue are waiting for a prefix being computed
        while position < len(self._waiting) and budget > 0 and len(self._running) < self.max_num_seqs:
            _, rid = self._waiting[position]
            if self._waiting_on.get(rid) in self._computing:
                position += 1
                continue
            request = self._requests[rid]
            # Leave at least the last token uncached so the step yields logits to sample from.
            cacheable_ids = request.all_token_ids[: request.num_tokens - 1]
            keys = self.block_manager.block_keys(cacheable_ids, request.cache_salt)
            hit_ids = self.block_manager.lookup_prefix(cacheable_ids, request.cache_salt, keys)
            # Host-tier hits continue the device ones: copied up, not computed.
            host_ids = self.block_manager.lookup_host_prefix(cacheable_ids, request.cache_salt, keys, len(hit_ids))
            num_hits = len(hit_ids) + len(host_ids)
            if num_hits < len(keys) and keys[num_hits] in self._computing:
                self._waiting_on[rid] = keys[num_hits]
                position += 1
                continue
            self._waiting_on.pop(rid, None)
            num_computed = num_hits * block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if self.block_manager.allocate_slots(rid, num_computed + num_new, hit_ids, host_ids) is None:
                break  # strict priority order: nobody overtakes the head of the queue
            del self._waiting[position]
            self._mark_computing(rid, keys, num_hits)
            if request.num_preemptions == 0 and not request.output_token_ids:
                request.num_cached_tokens = num_computed
                request.num_host_cached_tokens = len(host_ids) * block_size
            request.status = RequestStatus.RUNNING
            self._running[rid] = request
            self._on_worker.add(rid)
            block_ids = tuple(self.block_manager.block_ids(rid))
            scheduled[rid] = ScheduledNew(request, block_ids, num_computed, num_new)
            request.num_computed_tokens = num_computed + num_new
            self._count_placeholder(request)
            budget -= num_new
        return budget

    def _mark_computing(self, request_id: str, keys: list[bytes], num_hit_blocks: int) -> None:
        owned = [key for key in keys[num_hit_blocks:] if key not in self._computing]
        if owned:  # a key computed by another request stays that one's
            self._computing.claim(request_id, owned)

    def _done_computing(self, request_id: str) -> None:
        self._computing.release(request_id)

    def _make_plan(self, scheduled: dict[str, ScheduledNew | ScheduledCached], num_preemptions: int) -> StepPlan:
        copies_to_host, copies_to_device = self.block_manager.take_copies()  # made while this plan was built
        plan = StepPlan(
            step_id=self._next_step_id,
            new_requests=tuple(s for s in scheduled.values() if isinstance(s, ScheduledNew)),
            cached_requests=tuple(s for s in scheduled.values() if isinstance(s, ScheduledCached)),
            finished_request_ids=tuple(self._finished_ids),
            num_preemptions=num_preemptions,
            copies_to_host=copies_to_host,
            copies_to_device=copies_to_device,
        )
        self._next_step_id += 1
        self._finished_ids.clear()
        return plan

    def _preempt(self, victim: Request, scheduled: dict[str, ScheduledNew | ScheduledCached]) -> int:
        """Sends `victim` back to the queue; returns the budget it had taken in this step."""
        rid = victim.request_id
        entry = scheduled.pop(rid, None)
        del self._running[rid]
        self.block_manager.free(rid)
        self._forget_on_worker(rid)
        self._done_computing(rid)
        victim.status = RequestStatus.WAITING
        victim.num_computed_tokens = 0
        victim.num_output_placeholders = victim.num_draft_tokens = 0  # preempted only with no step in flight
        victim.num_preemptions += 1
        bisect.insort(self._waiting, (self._keys[rid], rid))
        return entry.num_scheduled_tokens if entry is not None else 0

    def update(self, plan: StepPlan, outputs: Sequence[RequestOutput]) -> list[RequestEvent]:
        by_id = {o.request_id: o for o in outputs}
        events: list[RequestEvent] = []
        for entry in (*plan.new_requests, *plan.cached_requests):
            request = entry.request
            assert request is not None, "plans are made by schedule(), which links each entry to its request"
            rid = request.request_id
            if self._running.get(rid) is not request:
                continue  # aborted, expired, finished or taken while the step was in flight
            output = by_id.get(rid)
            if output is not None and output.error:
                self._release(request, FinishReason.ABORT)
                events.append(RequestEvent(rid, (), (), FinishReason.ABORT,
                                           RequestError(ErrorKind.FAILED, output.error)))
                continue
            if entry.num_computed_tokens + entry.num_scheduled_tokens < request.num_tokens:
                self._publish(request)  # a prompt chunk: no logits were sampled
                continue
            request.num_output_placeholders -= 1
            if output is None or not output.token_ids:
                self._release(request, FinishReason.ABORT)
                events.append(RequestEvent(rid, (), (), FinishReason.ABORT, NO_TOKEN_ERROR))
                continue
            if request.num_draft_tokens and self.speculation:
                self.speculation.settle(request, entry, output)
            events.append(self._append(request, output))
        return events

    def _append(self, request: Request, output: RequestOutput) -> RequestEvent:
        self._done_computing(request.request_id)  # its prompt is computed and published
        self._keep_promise(request.request_id)
        reason: FinishReason | None = None
        num_taken = 0
        for token_id in output.token_ids:
            request.output_token_ids.append(token_id)
            num_taken += 1
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                break  # anything the worker sampled past a stop is not the client's
        self._publish(request)
        if reason is not None:
            self._release(request, reason)
        return RequestEvent(request.request_id, tuple(output.token_ids[:num_taken]),
                            tuple(output.logprobs[:num_taken]), reason)

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        if token_id in request.stop_token_ids or (not request.ignore_eos and token_id in self.eos_token_ids):
            return FinishReason.STOP
        if len(request.output_token_ids) >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _publish(self, request: Request) -> None:
        if not self.block_manager.has_unpublished_block(request.request_id, request.num_computed_tokens):
            return  # most decode steps fill no block: skip building the token list
        self.block_manager.cache_blocks(request.request_id, request.all_token_ids,
                                        request.num_computed_tokens, request.cache_salt)

    def _release(self, request: Request, reason: FinishReason) -> None:
        """Finishes a live request: frees its blocks now, tells the worker in the next plan."""
        rid = request.request_id
        if request.status is RequestStatus.WAITING:
            del self._waiting[bisect.bisect_left(self._waiting, (self._keys[rid], rid))]
            self._waiting_on.pop(rid, None)
        else:
            del self._running[rid]
        del self._requests[rid]
        del self._keys[rid]
        self.block_manager.free(rid)
        self._forget_on_worker(rid)
        self._done_computing(rid)
        self._keep_promise(rid)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _forget_on_worker(self, request_id: str) -> None:
        if request_id in self._on_worker:
            self._on_worker.discard(request_id)
            self._finished_ids[request_id] = None
