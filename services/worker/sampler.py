"""Turns one step's batch of next-token logits into one token (and logprobs) per request.

Why it is shaped this way:

- The whole batch goes through the same few tensor ops on the device (penalties, temperature,
  top-k, top-p, min-p, draw), so the cost of a step does not grow with Python work per row or per
  vocabulary entry, and nothing but the final ids and logprobs crosses back to the host.
- Draws use the exponential race: ``argmax(probs / E)`` with ``E ~ Exponential(1)`` per token
  picks token ``i`` with probability ``probs[i]`` (Gumbel-max in disguise). Each row needs one
  noise vector and no CDF search, and masked tokens (probability 0) can never win.
- A seeded row takes its noise from a generator seeded by ``hash(seed, len(output_token_ids))``.
  Its draw therefore depends only on the request's own history: not on its neighbours or position
  in the batch, not on preemption, and not on which worker recomputes it after a failover (for the
  same device type and torch version, whose generators must agree).
- ``logit_bias`` is added to the raw logits before penalties and temperature (OpenAI's and vLLM's
  order), in one scatter over the rows that have any; the others pass through untouched, so a batch
  without biases pays nothing for the feature.
- A constrained row (structured output, grammar.py) brings a mask of its allowed tokens; the
  others are set to -inf right after the biases, in one masked fill over those rows only, so every
  later filter and the draw keep them out and unconstrained rows pay nothing.
- Logprobs are of the raw logits, before biases, penalties and filters, as vLLM reports by default, so
  they describe the model rather than the sampling settings.
- A row with NaN or +inf logits fails alone (``error`` set, token -1); the rest of the batch goes
  on. -inf alone is legitimate (models mask with it) unless the whole row is -inf.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.sampling_rules import GREEDY_TEMPERATURE, MAX_NUM_LOGPROBS, SamplingParams

__all__ = ["GREEDY_TEMPERATURE", "MAX_NUM_LOGPROBS", "SamplingParams", "Sampler", "SamplingRow", "SampledToken",
           "apply_logit_bias", "apply_token_masks"]

NON_FINITE_LOGITS_ERROR = "non-finite logits"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingRow:
    """One request's row in a batch of logits."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # already generated; its length is the index of this draw
    token_mask: torch.Tensor | None = None  # bool [V]: the only tokens it may draw (a grammar's); None: any


@dataclass(frozen=True)
class SampledToken:
    token_id: int  # -1 when error is set
    logprob: float | None  # of the chosen token under log_softmax(raw logits); None unless asked
    top_token_ids: tuple[int, ...]  # best first
    top_logprobs: tuple[float, ...]
    error: str = ""  # this row failed alone; the others in the batch are valid


def row_seed(seed: int, draw_index: int) -> int:
    """Mixes a request seed and draw index into 63 bits; splitmix64 keeps nearby inputs apart."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (draw_index & _MASK64)) >> 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Returns ``logits`` with each row's ``logit_bias`` added; the input itself when no row has one.

    Ids beyond the logits' width are skipped: the scheduler checks ids against the vocabulary, and
    a padded vocabulary is only ever wider.
    """
    biased = [(i, row.params.logit_bias) for i, row in enumerate(rows) if row.params.logit_bias]
    if not biased:
        return logits
    num_vocab = logits.shape[1]
    flat_index, values = [], []
    for i, pairs in biased:
        for token_id, bias in pairs:
            if 0 <= token_id < num_vocab:
                flat_index.append(i * num_vocab + token_id)
                values.append(bias)
    out = logits.clone()
    if flat_index:
        out.view(-1).index_add_(0, torch.tensor(flat_index, device=logits.device),
                                torch.tensor(values, dtype=out.dtype, device=logits.device))
    return out


def apply_token_masks(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Returns ``logits`` with the tokens each masked row may not draw at -inf; the input itself
    when no row has a mask. A mask narrower than the logits (a padded vocabulary) allows none past it."""
    masked = [i for i, row in enumerate(rows) if row.token_mask is not None]
    if not masked:
        return logits
    allowed = torch.zeros(len(masked), logits.shape[1], dtype=torch.bool, device=logits.device)
    for j, i in enumerate(masked):
        mask = rows[i].token_mask
        width = min(mask.shape[0], logits.shape[1])
        allowed[j, :width] = mask[:width].to(logits.device)
    sub = _select_rows(logits, masked).masked_fill(~allowed, -math.inf)
    return _replace_rows(logits, masked, sub)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Returns float32 ``[B, V]`` logits with each row's penalties applied, in vLLM's order.

    Rows without penalties come back bit for bit, which keeps greedy equal to argmax of the raw
    logits. The input is never modified.
    """
    penalised = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not penalised:
        return logits
    device, num_vocab = logits.device, logits.shape[1]
    params = [rows[i].params for i in penalised]
    sub = _select_rows(logits, penalised)
    output_counts = _count_ids([rows[i].output_token_ids for i in penalised], num_vocab, device)
    output_seen = output_counts > 0

    if any(p.repetition_penalty != 1.0 for p in params):
        repetition = _column([p.repetition_penalty for p in params], device)
        prompt_seen = _count_ids([rows[i].prompt_token_ids for i in penalised], num_vocab, device) > 0
        # Divide positives and multiply negatives so the penalty always lowers the logit.
        scaled = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(prompt_seen | output_seen, scaled, sub)
    frequency = _column([p.frequency_penalty for p in params], device)
    presence = _column([p.presence_penalty for p in params], device)
    sub = sub - frequency * output_counts - presence * output_seen.float()
    return _replace_rows(logits, penalised, sub)


def _select_rows(tensor: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    # Most steps use every row; skipping the gather saves a [B, V] copy.
    if len(indices) == tensor.shape[0]:
        return tensor
    return tensor.index_select(0, torch.tensor(indices, device=tensor.device))


def _replace_rows(tensor: torch.Tensor, indices: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    if len(indices) == tensor.shape[0]:
        return rows
    return tensor.index_copy(0, torch.tensor(indices, device=tensor.device), rows)


def _count_ids(id_lists: Sequence[Sequence[int]], num_vocab: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each vocabulary id per row, as float32 ``[len(id_lists), num_vocab]``."""
    counts = torch.zeros(len(id_lists), num_vocab, dtype=torch.float32, device=device)
    ids = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long)
    if ids.numel() == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), torch.tensor([len(x) for x in id_lists]))
    # Ids outside the logits' vocabulary cannot affect them; the model's embedding already rejects them.
    keep = (ids >= 0) & (ids < num_vocab)
    flat = (rows[keep] * num_vocab + ids[keep]).to(device)
    counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p then min-p (Hugging Face's order).

    Masked tokens get probability exactly 0. ``logits`` are already penalised, one row per params.
    """
    num_vocab = logits.shape[1]
    device = logits.device
    logits = logits / _column([p.temperature for p in params], device)
    top_k = [p.top_k if 0 < p.top_k < num_vocab else num_vocab for p in params]
    # top_p = 1 must be a no-op even where rounding lets the cumulative mass reach 1 early.
    top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]
    if any(k < num_vocab for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _apply_top_k_top_p(logits, top_k, top_p)
    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        floor = _column(min_p, device) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, -math.inf)
    return logits.softmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=device).unsqueeze(0)
    k = torch.tensor(top_k, device=device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, -math.inf)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # Keep the smallest prefix whose mass reaches top_p; the best token always survives.
    drop = (mass_before >= _column(top_p, device)) & (rank > 0)
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    """Samples one token per row of a ``[B, V]`` logits batch; see the module docstring."""

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        # Unseeded rows share this stream, so their draws may depend on the batch; that is fine
        # because nobody can ask to reproduce them.
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(row_seed(seed, 0))

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        if not rows:
            return []
        raw = logits.to(device=self.device, dtype=torch.float32)
        # A row fails when it holds a NaN or +inf, or is all -inf: exactly when its max is not
        # finite (max propagates NaN). One pass over the logits instead of one per condition.
        failed = ~torch.isfinite(raw.amax(dim=-1))
        if failed.any():
            # Zeroing failed rows keeps NaN out of every batched op; their results are discarded.
            raw = torch.where(failed.unsqueeze(1), 0.0, raw)

        penalised = apply_penalties(apply_token_masks(apply_logit_bias(raw, rows), rows), rows)
        token_ids = penalised.argmax(dim=-1)  # final for greedy rows
        sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if sampled:
            probs = filtered_probs(_select_rows(penalised, sampled), [rows[i].params for i in sampled])
            noise = self._exponential_noise([rows[i] for i in sampled], logits.shape[1])
            token_ids = _replace_rows(token_ids, sampled, (probs / noise).argmax(dim=-1))

        logprobs = self._logprobs(raw, token_ids, rows)
        results = []
        for i, (token_id, is_failed) in enumerate(zip(token_ids.tolist(), failed.tolist())):
            if is_failed:
                results.append(SampledToken(-1, None, (), (), error=NON_FINITE_LOGITS_ERROR))
            elif i in logprobs:
                chosen, top_ids, top_values = logprobs[i]
                results.append(SampledToken(token_id, chosen, top_ids, top_values))
            else:
                results.append(SampledToken(token_id, None, (), ()))
        return results

    def _exponential_noise(self, rows: Sequence[SamplingRow], num_vocab: int) -> torch.Tensor:
        noise = torch.empty(len(rows), num_vocab, dtype=torch.float32, device=self.device)
        unseeded = [i for i, row in enumerate(rows) if row.params.seed is None]
        if unseeded:
            draws = torch.empty(len(unseeded), num_vocab, dtype=torch.float32, device=self.device)
            draws.exponential_(generator=self._generator)
            noise.index_copy_(0, torch.tensor(unseeded, device=self.device), draws)
        for i, row in enumerate(rows):
            if row.params.seed is None:
                continue
            generator = torch.Generator(device=self.device)
            generator.manual_seed(row_seed(row.params.seed, len(row.output_token_ids)))
            # A fresh tensor per row, so the values cannot depend on where the row sits.
            noise[i] = torch.empty(num_vocab, dtype=torch.float32, device=self.device).exponential_(
                generator=generator)
        # A zero draw would turn probs/noise into 0/0 for masked tokens.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _logprobs(self, raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow],
                  ) -> dict[int, tuple[float, tuple[int, ...], tuple[float, ...]]]:
        wanted = [i for i, row in enumerate(rows) if row.params.return_logprobs]
        if not wanted:
            return {}
        logprobs = torch.log_softmax(_select_rows(raw, wanted), dim=-1)
        chosen = logprobs.gather(1, _select_rows(token_ids, wanted).unsqueeze(1)).squeeze(1).tolist()
        num_top = min(max(rows[i].params.num_logprobs for i in wanted), raw.shape[1])
        top_values, top_ids = ([], [])
        if num_top:
            values, ids = logprobs.topk(num_top, dim=-1)  # sorted best first
            top_values, top_ids = values.tolist(), ids.tolist()
        result = {}
        for j, i in enumerate(wanted):
            n = rows[i].params.num_logprobs
            top = (tuple(top_ids[j][:n]), tuple(top_values[j][:n])) if num_top else ((), ())
            result[i] = (chosen[j], *top)
        return result
