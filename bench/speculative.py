"""`speculative` (letter n): what `--speculative ngram` buys on one stream, and what it costs where
nothing is there to accept.

The real model on one worker, one request at a time (single-stream latency is what speculation is
for). Three workloads, each replayed on a stack without speculation and on one with
`--speculative ngram --num-speculative-tokens 4`:
- `grounded`: chat prompts asking to repeat a given paragraph, with max_tokens about the
  paragraph's length, so the output copies the input and prompt lookup has something to find;
- `random`: prompts of random token ids: nothing in the prompt to copy, but greedy output of a
  small model often repeats itself, and prompt lookup finds that too (on SmolLM2-135M most drafts
  were kept: this is not a workload where nothing is accepted, which greedy decoding of this model
  does not readily give);
- `rejected`: the workload where drafts are proposed and (almost) none kept. Prompts are a line
  of 200 random decimal digits, decoded sampled (temperature 1, seeded per request); the model
  goes on writing digits, whose last two almost always occur earlier in the line, so the proposer
  drafts nearly every step, and a sampled digit matches the draft only by chance. A check run
  (3 requests of 48 tokens, SmolLM2-135M) kept 18 of 257 drafts (7%). This is what speculation
  costs when it guesses and misses: k extra positions per forward pass, and no async overlap.
`grounded` and `random` are greedy and ignore_eos as in every scenario, `rejected` is seeded and
ignore_eos, so each run of each computes the same tokens with and without speculation (a seeded
row draws by position). Each run records output throughput and, from the scheduler's counters,
drafts proposed and accepted.
Targets: grounded speed-up >= 1.5x; random >= 0.95x; rejected >= 0.95x (no loss beyond this
machine's noise where drafts are proposed and rejected).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Callable

from bench.clients import read_counters, run_grpc
from bench.real_model import _real_model
from bench.report import ScenarioResult
from bench.scenarios import Options, running_stack, vocab_size
from bench.workload import Workload, WorkloadRequest, random_workload

_SPEC_COUNTERS = ("switchyard_spec_decode_draft_tokens_total", "switchyard_spec_decode_accepted_tokens_total")
_SPEC_ARGS = ("--speculative", "ngram", "--num-speculative-tokens", "4")
_TEXTS = (
    "The river rises in the northern hills, runs south through three market towns, and reaches the sea "
    "at a wide estuary where the old harbour still stands. Fishing boats leave before dawn and return "
    "in the afternoon, when the tide allows them to cross the sand bar.",
    "To reset the device, hold the power button for ten seconds until the light turns orange, release "
    "it, then press it once more. The device restarts with its factory settings, and every saved "
    "network must be entered again before it can connect.",
    "Our library opens at nine on weekdays and at ten on Saturdays. Books may be borrowed for three "
    "weeks and renewed twice, online or at the front desk, unless another reader has reserved them.",
    "The committee met on Tuesday to review the budget. It approved the new roof for the school, "
    "postponed the repairs to the bridge until spring, and asked for two more quotes for the park lights.",
    "Mix the flour and the salt in a large bowl, add the warm water slowly, and knead the dough for ten "
    "minutes until it is smooth. Leave it covered in a warm place for an hour, then shape the loaves.",
    "Trains to the airport leave every fifteen minutes from platform four. The journey takes thirty "
    "minutes, tickets can be bought on board, and the last train departs shortly before midnight.",
)


def grounded_workload(model: Path, num_requests: int) -> Workload:
    """Chat prompts asking the model to repeat a paragraph; max_tokens is about its length."""
    from services.tokenizer.codec import Codec  # noqa: PLC0415 - loads the tokenizer only when run

    codec = Codec(model)
    requests = []
    for i in range(num_requests):
        text = _TEXTS[i % len(_TEXTS)]
        chat = [("user", f"Repeat the following text exactly, word for word:\n\n{text}")]
        prompt = codec.encode(codec.render_chat(chat))
        requests.append(WorkloadRequest(f"grounded-{i}", tuple(prompt), len(codec.encode(text)) + 4))
    return Workload("grounded", tuple(requests), concurrency=1, params=dict(num_requests=num_requests,
                                                                            texts=len(_TEXTS), concurrency=1))


def rejected_workload(model: Path, *, num_requests: int, num_digits: int, output_len: int, temperature: float,
                      seed: int) -> Workload:
    """Prompts that give prompt lookup matches whose drafts the model seldom keeps.

    Each prompt is a line of `num_digits` random decimal digits (one token each), so every pair of
    digits occurs in it, each followed by different digits at its occurrences. The model, sampled
    at `temperature` (seeded per request, so every run computes the same tokens), goes on writing
    digits; their last two (or more) then occur earlier, the proposer drafts the digits that
    followed there, and the sampled output matches a draft only by chance (about 1 in 10)."""
    from services.tokenizer.codec import Codec  # noqa: PLC0415 - loads the tokenizer only when run

    codec = Codec(model)
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        digits = "".join(rng.choice("0123456789") for _ in range(num_digits))
        prompt = codec.encode(f"Here are {num_digits} random digits, and then more of them:\n{digits}")
        requests.append(WorkloadRequest(f"rejected-{i}", tuple(prompt), output_len, temperature=temperature,
                                        seed=seed + i))
    return Workload("rejected", tuple(requests), concurrency=1, seed=seed, params=dict(
        num_requests=num_requests, num_digits=num_digits, output_len=output_len, temperature=temperature,
        concurrency=1))


def speculative(o: Options, r: ScenarioResult) -> None:
    model = _real_model(o)
    workloads = [
        grounded_workload(model, o.pick(12, 2)),
        random_workload("random", num_requests=o.pick(8, 2), prompt_len=(32, 64), output_len=o.pick((64, 64), (8, 8)),
                        vocab_size=vocab_size(model), concurrency=1, seed=5),
        rejected_workload(model, num_requests=o.pick(8, 2), num_digits=o.pick(200, 32), output_len=o.pick(64, 8),
                          temperature=1.0, seed=7),
    ]
    r.config.update(model=model.name, speculative_args=list(_SPEC_ARGS), workloads=[w.params for w in workloads])
    for mode, scheduler_args in (("plain", ()), ("ngram", _SPEC_ARGS)):
        with running_stack(model, scheduler_args=scheduler_args) as stack:
            scheduler_url = stack.metrics_urls["scheduler"]
            for w in workloads:
                key = f"{w.name}_{mode}"
                before = read_counters(scheduler_url, _SPEC_COUNTERS)
                records, duration_s = asyncio.run(run_grpc(stack.tokenizer_address, w, label=key))
                after = read_counters(scheduler_url, _SPEC_COUNTERS)
                drafted, kept = (after[n] - before[n] for n in _SPEC_COUNTERS)
                r.add_run(key, records, duration_s, num_draft_tokens=drafted, num_accepted_tokens=kept,
                          acceptance_rate=kept / drafted if drafted else None)
                print(f"    {key}: {r.metric(key, 'output_throughput_tokens_per_s') or 0:.1f} tok/s, "
                      f"{kept:.0f} of {drafted:.0f} drafts kept", flush=True)
    grounded = r.ratio("grounded ngram/plain", "grounded_ngram", "grounded_plain")
    unmatched = r.ratio("random ngram/plain", "random_ngram", "random_plain")
    rejected = r.ratio("rejected ngram/plain", "rejected_ngram", "rejected_plain")
    r.target("single-stream speed-up, input-grounded (repeat a text)", grounded, ">=", 1.5, "x")
    r.target("single-stream speed, random prompts (nothing in the prompt to copy)", unmatched, ">=", 0.95, "x")
    r.target("single-stream speed, drafts proposed but (almost) none kept (sampled digits)", rejected, ">=", 0.95, "x")


SCENARIOS: dict[str, tuple[Callable[[Options, ScenarioResult], None], str]] = {
    "speculative": (speculative, "Real model, 1 worker, 1 stream: output throughput with --speculative ngram vs "
                    "without, on prompts asking to repeat a text, on random prompts, and on sampled random digits "
                    "(drafts proposed, few kept)."),
}
