"""The `scheduler.request` span: one per request, carrying the routing decision and timings.

It is a child of the front door's span (through the incoming Generate call, or the traceparent a
Connect submission carries), so it sits in the front door's trace; its
traceparent travels to the worker with the request, where every `worker.step` span that computes
the request links back to it. Attribute names follow the OpenTelemetry GenAI conventions where one
exists (`gen_ai.usage.*`, `gen_ai.request.*`); the rest are `switchyard.*`.
"""

from __future__ import annotations

import json

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.scheduler.fleet import LiveRequest
from services.scheduler.request import RequestError

_tracer = trace.get_tracer("switchyard.scheduler")
_propagator = TraceContextTextMapPropagator()


def start_request_span(request_id: str, parent_traceparent: str = "") -> tuple[Span, str]:
    """Starts the span (not made current: the handler is a generator that yields across contexts)
    and returns it with its W3C traceparent for the workers.

    Its parent is the current context (a Generate call's server span), or `parent_traceparent`
    when given: on a Connect stream, which carries many requests, each submission brings its own."""
    parent = _propagator.extract({"traceparent": parent_traceparent}) if parent_traceparent else None
    span = _tracer.start_span("scheduler.request", context=parent, attributes={"switchyard.request_id": request_id})
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier.get("traceparent", "")


def end_request_span(span: Span, live: LiveRequest | None, finish_reason: str,
                     error: RequestError | None = None) -> None:
    if live is not None:
        request, decision = live.request, live.decision
        attributes = {
            "switchyard.pool": decision.pool,
            "switchyard.worker": live.worker.address,
            "switchyard.route.worker": decision.worker,
            "switchyard.route.overlap_tokens": decision.overlap_tokens,
            "switchyard.route.cost": decision.cost,
            "switchyard.route.sticky": decision.sticky,
            "switchyard.route.candidates": json.dumps([
                {"worker": c.address, "overlap_tokens": c.overlap_tokens, "host_overlap_tokens": c.host_overlap_tokens,
                 "uncached_prompt_tokens": c.uncached_prompt_tokens, "load_tokens": c.load_tokens, "cost": c.cost}
                for c in decision.candidates
            ]),
            "switchyard.cached_tokens": request.num_cached_tokens,
            "switchyard.host_cached_tokens": request.num_host_cached_tokens,
            "switchyard.route.host_overlap_tokens": decision.host_overlap_tokens,
            "switchyard.num_preemptions": request.num_preemptions,
            "gen_ai.request.max_tokens": request.max_tokens,
            "gen_ai.request.temperature": request.sampling.temperature,
            "gen_ai.request.top_p": request.sampling.top_p,
            "gen_ai.usage.input_tokens": request.num_prompt_tokens,
            "gen_ai.usage.output_tokens": len(request.output_token_ids),
            "gen_ai.response.finish_reasons": [finish_reason],
        }
        if request.first_scheduled_s is not None:
            attributes["switchyard.queue_time_s"] = request.first_scheduled_s - request.arrival_s
        if request.first_token_s is not None:
            attributes["switchyard.time_to_first_token_s"] = request.first_token_s - request.arrival_s
        span.set_attributes(attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error.message))
    span.end()
