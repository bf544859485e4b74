"""`structured_output` (letter o): what constrained decoding (`response_format` json_schema) costs
in output throughput, against the same prompts decoded freely.

The real model on one worker. Chat prompts each ask for one JSON record (a person, a product or an
event) with fixed fields; every record kind has a fixed JSON schema. Each prompt runs once free (no
response_format) and once constrained (response_format json_schema with its kind's schema), both
greedy with the same max_tokens, at concurrency 1 and at concurrency 8. Neither sets ignore_eos: a
finished grammar allows only EOS, so a constrained request ends with its JSON, and the free one
ends where the model stops, so the two produce different numbers of tokens; throughput (output
tokens per second of the run) is what is compared, and each run also records how many outputs
parse as JSON. Each mode gets its own stack, so neither finds the other's prompts in the prefix
cache; within a stack the concurrency-8 run follows the concurrency-1 run over the same prompts in
both modes alike. Before the constrained runs, one constrained request builds the worker's grammar
vocabulary (about a second, once per worker), which is start-up, not per-token cost.

Target: a stream's decode pace (1/TPOT) constrained over free >= 0.8 at concurrency 8, i.e. the mask
costs at most a fifth of a step. Output throughput of the runs is recorded too, but the two modes
produce different numbers of tokens (constrained answers stop when the JSON closes), so its ratio
also weighs prefill and the batch's draining tail differently, and carries no target.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from bench.clients import run_grpc
from bench.real_model import _real_model
from bench.records import RequestRecord
from bench.report import ScenarioResult
from bench.scenarios import Options, running_stack
from bench.workload import Workload, WorkloadRequest


def _record(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


_STR = {"type": "string"}
# kind -> (schema, prompt template with {subject}); the fields named in the prompt are the schema's.
KINDS: dict[str, tuple[dict[str, Any], str]] = {
    "person": (_record({"name": _STR, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                        "occupation": _STR, "city": _STR}),
               "Describe a fictional {subject} as a JSON object with the fields name, age, occupation and city."),
    "product": (_record({"name": _STR, "price": {"type": "number", "minimum": 0},
                         "currency": {"enum": ["USD", "EUR", "GBP"]}, "in_stock": {"type": "boolean"}}),
                "Describe a {subject} for sale in an online shop as a JSON object with the fields name, price, "
                "currency (USD, EUR or GBP) and in_stock."),
    "event": (_record({"title": _STR, "date": _STR, "city": _STR,
                       "attendees": {"type": "integer", "minimum": 0}}),
              "Describe a {subject} as a JSON object with the fields title, date (YYYY-MM-DD), city and attendees."),
}
SUBJECTS: dict[str, tuple[str, ...]] = {
    "person": ("baker", "lighthouse keeper", "software engineer", "nurse", "pilot", "librarian"),
    "product": ("pair of running shoes", "coffee grinder", "desk lamp", "backpack", "kettle"),
    "event": ("music festival", "chess tournament", "science fair", "marathon", "book launch"),
}
CONCURRENCIES = (1, 8)


def json_workload(codec: Any, *, num_requests: int, max_tokens: int, constrained: bool, concurrency: int) -> Workload:
    """`num_requests` chat prompts cycling through the kinds and subjects; with `constrained`, each
    carries its kind's schema as response_format. Greedy, EOS honoured."""
    pairs = [(kind, subject) for i in range(max(len(s) for s in SUBJECTS.values()))
             for kind, subjects in SUBJECTS.items() for subject in subjects[i:i + 1]]
    requests = []
    for i in range(num_requests):
        kind, subject = pairs[i % len(pairs)]
        schema, template = KINDS[kind]
        prompt = codec.encode(codec.render_chat([("user", template.format(subject=subject))]))
        requests.append(WorkloadRequest(f"{kind}-{i}", tuple(prompt), max_tokens, ignore_eos=False,
                                        json_schema=json.dumps(schema) if constrained else ""))
    mode = "constrained" if constrained else "free"
    return Workload(f"{mode}_c{concurrency}", tuple(requests), concurrency=concurrency,
                    params=dict(num_requests=num_requests, max_tokens=max_tokens, mode=mode, concurrency=concurrency))


def _num_valid_json(codec: Any, records: list[RequestRecord]) -> int:
    valid = 0
    for r in records:
        try:
            valid += isinstance(json.loads(codec.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)), dict)
        except ValueError:
            pass
    return valid


def structured_output(o: Options, r: ScenarioResult) -> None:
    from services.tokenizer.codec import Codec  # noqa: PLC0415 - loads the tokenizer only when run

    model = _real_model(o)
    codec = Codec(model)
    num_requests, max_tokens = o.pick(16, 2), o.pick(128, 16)
    concurrencies = o.pick(CONCURRENCIES, (1, 2))
    r.config.update(model=model.name, num_requests=num_requests, max_tokens=max_tokens,
                    concurrencies=list(concurrencies), schemas={k: s for k, (s, _) in KINDS.items()})
    for constrained in (False, True):
        with running_stack(model) as stack:
            if constrained:  # the worker builds its grammar vocabulary on the first constrained request
                warm = json_workload(codec, num_requests=1, max_tokens=8, constrained=True, concurrency=1)
                asyncio.run(run_grpc(stack.tokenizer_address, warm, label="warmup (grammar vocabulary)"))
            for concurrency in concurrencies:
                w = json_workload(codec, num_requests=num_requests, max_tokens=max_tokens, constrained=constrained,
                                  concurrency=concurrency)
                records, duration_s = asyncio.run(run_grpc(stack.tokenizer_address, w, label=w.name))
                r.add_run(w.name, records, duration_s, num_valid_json=_num_valid_json(codec, records))
                print(f"    {w.name}: {r.metric(w.name, 'output_throughput_tokens_per_s') or 0:.1f} tok/s, "
                      f"{r.runs[w.name]['num_valid_json']} of {len(records)} outputs are JSON objects", flush=True)
    for concurrency in concurrencies:
        r.ratio(f"output throughput constrained/free c{concurrency}", f"constrained_c{concurrency}",
                f"free_c{concurrency}")
        # Decode pace: free TPOT over constrained TPOT, i.e. a stream's tokens per second with the
        # mask over without. The throughput ratio above also counts that constrained answers are
        # shorter (the JSON ends; free text runs to max_tokens), so prefill and the batch's
        # draining tail weigh more in its run; the pace is the per-token cost of the mask.
        pace = r.ratio(f"decode pace constrained/free c{concurrency}", f"free_c{concurrency}",
                       f"constrained_c{concurrency}", "tpot_s", "mean")
        if concurrency == concurrencies[-1]:
            r.target(f"decode pace (1/TPOT), constrained/free at concurrency {concurrency}", pace, ">=", 0.8, "x")


SCENARIOS: dict[str, tuple[Callable[[Options, ScenarioResult], None], str]] = {
    "structured_output": (structured_output, "Real model, 1 worker: output throughput with response_format "
                          "json_schema vs free decoding of the same JSON-asking prompts, at concurrency 1 and 8."),
}
