"""`speculative` (letter n): what `--speculative ngram` buys on one stream, and what it costs where
nothing is there to accept.

The real model on one worker, one request at a time (single-stream latency is what speculation is
for). Two workloads, each replayed on a stack without speculation and on one with
`--speculative ngram --num-speculative-tokens 4`:
- `grounded`: chat prompts asking to repeat a given paragraph, with max_tokens about the
  paragraph's length, so the output copies the input and prompt lookup has something to find;
- `random`: prompts of random token ids: nothing in the prompt to copy, but greedy output of a
  small model often repeats itself, and prompt lookup finds that too (on SmolLM2-135M most drafts
  were kept: this is not a workload where nothing is accepted, which greedy decoding of this model
  does not readily give).
Greedy and ignore_eos as in every scenario, so each run computes the same tokens. Each run
records output throughput and, from the scheduler's counters, drafts proposed and accepted.
Targets: grounded speed-up >= 1.5x; random >= 0.95x (no loss beyond this machine's noise).
"""

from __future__ import annotations

import asyncio
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


def speculative(o: Options, r: ScenarioResult) -> None:
    model = _real_model(o)
    workloads = [
        grounded_workload(model, o.pick(12, 2)),
        random_workload("random", num_requests=o.pick(8, 2), prompt_len=(32, 64), output_len=o.pick((64, 64), (8, 8)),
                        vocab_size=vocab_size(model), concurrency=1, seed=5),
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
    r.target("single-stream speed-up, input-grounded (repeat a text)", grounded, ">=", 1.5, "x")
    r.target("single-stream speed, random prompts (nothing in the prompt to copy)", unmatched, ">=", 0.95, "x")


SCENARIOS: dict[str, tuple[Callable[[Options, ScenarioResult], None], str]] = {
    "speculative": (speculative, "Real model, 1 worker, 1 stream: output throughput with --speculative ngram vs "
                    "without, on prompts asking to repeat a text and on random prompts."),
}
