"""Verifying draft tokens (speculative decoding): which of a step's guessed tokens the model keeps.

The scheduler proposes up to k draft tokens for a decoding request (prompt lookup, see
services/scheduler/speculation.py) and schedules them after its last token, so one forward pass
yields logits at k+1 positions: after the last token, and after each draft. Each position is
sampled exactly as an ordinary step would sample it, with the drafts before it counted as already
generated (penalties see them, and a seeded row draws by `(seed, len(output_token_ids))`, i.e. by
its position). The worker then keeps the sampled tokens up to and including the first one that
differs from its draft, or all k+1 when every draft matched.

Why this is exact, not an approximation:
- Greedy: the kept tokens are the argmaxes a one-token-per-step run computes at the same
  positions over the same prefix, so the output is token-identical (up to the floating-point
  difference between computing k+1 positions in one pass and one at a time).
- Sampled: the draft is deterministic (all its mass on one token t), so standard speculative
  rejection sampling accepts t with probability p(t) — the target probability after penalties,
  temperature, top-k/top-p/min-p — and on rejection draws from the residual p with t removed and
  renormalised. Drawing x ~ p and accepting iff x == t does both at once: P(x == t) = p(t), and
  x given x != t is exactly the residual. Because x is drawn with the very noise the ordinary
  sampler would use at that position, a seeded request produces the same tokens with and without
  speculation, and stays reproducible by (seed, position).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.worker.sampler import SampledToken, SamplingRow


def draft_rows(row: SamplingRow, draft_token_ids: Sequence[int]) -> list[SamplingRow]:
    """The request's k+1 sampling rows: after its last token, then after each draft in turn."""
    if not draft_token_ids:
        return [row]  # the common case: no copy of a long output
    outputs = list(row.output_token_ids)
    return [SamplingRow(row.params, row.prompt_token_ids, outputs + list(draft_token_ids[:j]))
            for j in range(len(draft_token_ids) + 1)]


def accepted(sampled: Sequence[SampledToken], draft_token_ids: Sequence[int]) -> list[SampledToken]:
    """The tokens kept from one request's k+1 samples: every sample up to and including the first
    that differs from its draft (all k+1 when all k drafts match). A failed row ends the list
    before it: the tokens before it stand, and the next step meets the failure at its position."""
    kept: list[SampledToken] = []
    for j, token in enumerate(sampled):
        if token.error:
            break
        kept.append(token)
        if j >= len(draft_token_ids) or token.token_id != draft_token_ids[j]:
            break
    return kept
