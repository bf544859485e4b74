"""One request is one trace across three processes, received by an in-process OTLP collector."""

from __future__ import annotations

import time

import grpc
import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc

from tests.deploy.test_stack import make_config
from tests.otlp import stack_with_collector

pytestmark = pytest.mark.e2e


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value or v.int_value or v.double_value or v.bool_value or list(
            x.string_value for x in v.array_value.values)
    return out


@pytest.fixture(scope="module")
def traced_stack(tiny_model_dir, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("run"), tiny_model_dir,
                         services=("worker", "scheduler", "tokenizer"))
    with stack_with_collector(config) as running:
        yield running


def test_one_request_is_one_trace_across_three_processes(traced_stack) -> None:
    stack, collector = traced_stack
    with grpc.insecure_channel(stack.tokenizer_address) as channel:
        api = generation_pb2_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(request_id="traced-1", prompt="trace me " * 40,
                                     sampling=pb.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        responses = list(api.Generate(request, timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 6

    def request_spans():
        front = [s for _, s in collector.named("tokenizer.generate") if attrs(s).get("switchyard.request_id") == "traced-1"]
        sched = [s for _, s in collector.named("scheduler.request") if attrs(s).get("switchyard.request_id") == "traced-1"]
        return front, sched

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        front, sched = request_spans()
        steps = [(svc, s) for svc, s in collector.named("worker.step")
                 if sched and any(link.span_id == sched[0].span_id for link in s.links)]
        if front and sched and len(steps) >= 6:
            break
        time.sleep(0.2)
    front, sched = request_spans()
    assert len(front) == 1 and len(sched) == 1, "each request has exactly one front-door and one scheduler span"
    generate, scheduled = front[0], sched[0]
    trace_id = generate.trace_id
    assert scheduled.trace_id == trace_id

    # scheduler.request is a child of tokenizer.generate: the traceparent travels in the submission
    # on the front door's shared Connect stream, which itself belongs to no request's trace.
    by_id = {span.span_id: span for _, span in collector.spans if span.trace_id == trace_id}
    services = {span.span_id: svc for svc, span in collector.spans if span.trace_id == trace_id}
    ancestor, chain = scheduled, []
    while ancestor.span_id != generate.span_id and ancestor.parent_span_id in by_id:
        ancestor = by_id[ancestor.parent_span_id]
        chain.append(f"{services[ancestor.span_id]}:{ancestor.name}")
    assert ancestor.span_id == generate.span_id, f"scheduler.request's ancestors stop at {chain}"
    assert chain == ["switchyard-tokenizer:tokenizer.generate"]
    assert not [s for _, s in collector.spans if s.name.endswith("/Connect")], "the shared stream has no span"
    assert not [s for _, s in collector.spans if s.trace_id == trace_id and s.name.endswith("Scheduler/Generate")]
    assert services[generate.span_id] == "switchyard-tokenizer"
    assert services[scheduled.span_id] == "switchyard-scheduler"

    # Worker steps (one per step, in the worker processes) link back into this trace.
    assert len(steps) >= 6  # at least the prefill and one step per further token
    for service, step in steps:
        assert service == "switchyard-worker"
        link = next(link for link in step.links if link.span_id == scheduled.span_id)
        assert link.trace_id == trace_id
        step_attrs = attrs(step)
        assert step_attrs["switchyard.batch_size"] >= 1
        assert "switchyard.num_prefill_tokens" in step_attrs or "switchyard.num_decode_tokens" in step_attrs

    generate_attrs, sched_attrs = attrs(generate), attrs(scheduled)
    assert generate_attrs["gen_ai.usage.output_tokens"] == 6
    assert generate_attrs["gen_ai.request.max_tokens"] == 6
    assert generate_attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert sched_attrs["switchyard.worker"] in stack.worker_addresses
    assert sched_attrs["switchyard.pool"] == "default"
    assert "switchyard.queue_time_s" in sched_attrs and "switchyard.time_to_first_token_s" in sched_attrs
    assert "switchyard.route.candidates" in sched_attrs
