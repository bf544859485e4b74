"""Speculative decoding by prompt lookup (n-gram): the scheduler's half.

Proposing happens here, not on the worker, because the scheduler already holds every request's
tokens and plans every step: the drafts travel as part of the step's scheduled tokens
(`ScheduledCached.draft_token_ids`), so the token budget, block allocation, `max_tokens` and
`max_model_len` see them like any other token, and the worker needs no flag and no state of its
own. The worker computes logits at the k+1 positions in one forward pass over the paged KV,
verifies the drafts (services/worker/speculation.py) and returns the accepted ones plus one more;
`settle` then rolls `num_computed_tokens` back to them and frees the blocks that held only
rejected slots.

The proposer needs no draft model: when the last n tokens (n from `max_n` down to `min_n`) also
occur earlier in the request's own tokens, prompt included, it proposes the tokens that followed
their latest earlier occurrence. That pays off where output copies its input (rewrite, summarise,
extract, code edits) and proposes nothing elsewhere, so a request with no match is decoded
exactly as without speculation. The search is `bytes.rfind` over the ids packed as int32: C speed,
no per-request index to keep in step with preemption, moves and aborts.

A request with drafts in flight is never planned ahead (async scheduling): its step ends at any
of k+1 lengths, so the position of its next input is known only from the reply. Nor is a decode
that might get drafts next (`may_draft_next`, asked by `Batcher._num_wanted`): once decoded ahead,
a request has a token in flight whenever its next step is planned, and would never get drafts
again. A request whose last token occurs nowhere earlier cannot match any n-gram in its next step,
so it keeps async scheduling's overlap, as do prompt chunks and admissions.

Drafts cost where none are kept: verifying k drafts is a forward pass over k+1 tokens, which on a
CPU costs noticeably more than one (a sampled stream whose drafts were all rejected ran at 0.75x
of plain here). So a request backs off: after a step that kept none of its drafts it gets no
proposals in the next 2, 4, 8, ... up to `MAX_BACKOFF_PLANS` plans it takes part in; a step that
keeps half of its drafts or more ends the streak, one that keeps fewer shortens it by one (sampled
text keeps a draft by chance now and then, which must not restart the backoff from 2).
Where nothing is accepted a request then pays for one verification in every few dozen steps; where
most are, a lone miss costs two plans without drafts. Greedy and seeded output do not change:
drafts never change which tokens are sampled, only how many steps they take.

Knobs (constructor arguments): `num_speculative_tokens` (k, the most drafts per step), `min_n` and
`max_n` (the n-gram lengths tried; below 2 single tokens match too often to be worth verifying).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import replace

from services.scheduler.block_manager import BlockManager
from services.scheduler.plan import RequestOutput, ScheduledCached, ScheduledNew
from services.scheduler.request import Request
from shared.errors import InvalidArgument

SPECULATIVE_METHODS = ("none", "ngram")
MAX_BACKOFF_PLANS = 64  # the longest a request goes without proposals after steps that kept nothing
_ID_BYTES = 4  # ids are packed as int32 for the search


class NgramProposer:
    """Proposes up to k tokens that followed the latest earlier occurrence of the context's last n-gram."""

    def __init__(self, num_speculative_tokens: int, *, min_n: int = 2, max_n: int = 4) -> None:
        if num_speculative_tokens < 1:
            raise InvalidArgument(f"must be >= 1, got {num_speculative_tokens}", field="num_speculative_tokens")
        if not 1 <= min_n <= max_n:
            raise InvalidArgument(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}", field="ngram")
        self.num_speculative_tokens = num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: Sequence[int], max_num_tokens: int) -> tuple[int, ...]:
        """At most min(k, `max_num_tokens`) draft tokens continuing `token_ids`; () when no n-gram matches."""
        k = min(self.num_speculative_tokens, max_num_tokens)
        num_tokens = len(token_ids)
        if k < 1 or num_tokens <= self.min_n:
            return ()
        data = array("i", token_ids).tobytes()
        # An earlier occurrence must end before the last token, so at least one token follows it.
        search_end = (num_tokens - 1) * _ID_BYTES
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            index = _rfind_ids(data, data[-n * _ID_BYTES:], search_end)
            if index >= 0:
                return tuple(token_ids[index + n:index + n + k])
        return ()

    def may_match_next(self, token_ids: Sequence[int]) -> bool:
        """Whether an n-gram ending in one more, unknown token could match at the next step: its
        known part, the last `min_n - 1` tokens, occurs earlier than at the very end."""
        if self.min_n <= 1:
            return True
        num_known = self.min_n - 1
        if len(token_ids) <= num_known:
            return False
        data = array("i", token_ids).tobytes()
        return _rfind_ids(data, data[-num_known * _ID_BYTES:], (len(token_ids) - 1) * _ID_BYTES) >= 0


def _rfind_ids(data: bytes, pattern: bytes, end: int) -> int:
    """Index (in ids) of the last occurrence of `pattern` within `data[:end]`, both packed ids; -1 if none."""
    pos = data.rfind(pattern, 0, end)
    while pos > 0 and pos % _ID_BYTES:  # matched across id boundaries: look further back
        pos = data.rfind(pattern, 0, pos + len(pattern) - 1)
    return pos // _ID_BYTES if pos >= 0 and pos % _ID_BYTES == 0 else -1


def num_accepted(num_drafts: int, output: RequestOutput) -> int:
    """Drafts a step's reply kept: the reply holds them and one more token."""
    return max(0, min(len(output.token_ids) - 1, num_drafts))


class Speculation:
    """The Batcher's drafts: added to a planned step, settled when its reply comes. Counts drafts
    proposed and accepted (tests and benchmarks read them; metrics count from the replies)."""

    def __init__(self, proposer: NgramProposer, block_manager: BlockManager, max_model_len: int) -> None:
        self.proposer = proposer
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.num_draft_tokens_total = 0  # proposed and verified
        self.num_accepted_tokens_total = 0  # of those, kept
        self.num_steps_with_drafts_total = 0

    def add_drafts(self, scheduled: dict[str, ScheduledNew | ScheduledCached], budget: int) -> int:
        """Extends the plan's plain decodes with drafts; returns the budget left.

        Runs once everything else is planned, so a guess only takes budget and free blocks (never
        a cached prefix's, never by preempting) that nothing else in the step wanted. Drafts stop
        where every token the step can return (the drafts and one more) still fits `max_tokens`
        and `max_model_len`, so no step is planned past either and no block past what admission
        counted is ever asked for."""
        manager = self.block_manager
        for rid, entry in scheduled.items():
            request = entry.request
            if request is not None and request.draft_backoff_plans > 0:
                request.draft_backoff_plans -= 1  # counts the plans it takes part in
                continue
            if (budget < 1 or not isinstance(entry, ScheduledCached) or request is None
                    or entry.num_scheduled_tokens != 1 or entry.num_computed_tokens != request.num_tokens - 1
                    or request.num_output_placeholders != 1 or request.grammar):
                continue  # not a plain decode of a token already known here, or a constrained one
            num_slots = (len(manager.block_ids(rid)) + manager.num_blocks_free) * manager.block_size
            limit = min(budget, request.max_tokens - len(request.output_token_ids) - 1,
                        self.max_model_len - request.num_tokens - 1, num_slots - request.num_computed_tokens)
            drafts = self.proposer.propose(request.all_token_ids, limit) if limit > 0 else ()
            added = manager.allocate_slots(rid, request.num_computed_tokens + len(drafts)) if drafts else None
            if added is None:
                continue
            scheduled[rid] = replace(entry, new_block_ids=entry.new_block_ids + tuple(added),
                                     num_scheduled_tokens=1 + len(drafts), draft_token_ids=drafts)
            request.num_computed_tokens += len(drafts)
            request.num_draft_tokens = len(drafts)
            budget -= len(drafts)
        return budget

    def may_draft_next(self, request: Request) -> bool:
        """Whether the request's next decode might get drafts, its step in flight not answered yet
        (not while it backs off: it keeps async scheduling's overlap then)."""
        return not request.draft_backoff_plans and not request.grammar and self.proposer.may_match_next(request.all_token_ids)

    def settle(self, request: Request, entry: ScheduledCached, output: RequestOutput) -> None:
        """The reply to a step with drafts: the computed count drops to the accepted tokens (the
        last returned token is not computed yet, as after any decode) and the blocks past it go
        back to the pool; the worker drops the same blocks from its table."""
        num_drafts = len(entry.draft_token_ids)
        accepted = num_accepted(num_drafts, output)
        request.num_computed_tokens = entry.num_computed_tokens + 1 + accepted
        request.num_draft_tokens = 0
        if num_drafts and not accepted:
            request.num_draft_misses += 1
            request.draft_backoff_plans = min(2 ** request.num_draft_misses, MAX_BACKOFF_PLANS)
        elif 2 * accepted >= num_drafts:
            request.num_draft_misses = 0
        else:  # a lucky draft now and then (sampled text) must not restart the backoff from 2
            request.num_draft_misses = max(0, request.num_draft_misses - 1)
        self.block_manager.free_tail(request.request_id, request.num_computed_tokens)
        self.num_draft_tokens_total += num_drafts
        self.num_accepted_tokens_total += accepted
        self.num_steps_with_drafts_total += 1
