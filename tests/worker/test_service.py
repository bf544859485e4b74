"""The worker over real gRPC: in-process on loopback, and as a separate process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.worker.v1 import worker_pb2 as pb
from switchyard.worker.v1 import worker_pb2_grpc

from services.worker import wire
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.servicer import WorkerServicer
from shared.channel import insecure_channel
from shared.server import GrpcServer
from tests.conftest import REPO_ROOT
from tests.reference import assert_greedy_matches, hf_greedy
from tests.worker.harness import Job, MiniScheduler
from tests.worker.test_executor import make_prompts


@pytest.fixture
async def worker(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, num_blocks=128, block_size=16)
    servicer = WorkerServicer(Executor(runner), version="v-test")
    server = GrpcServer(service_name="worker", register=servicer.register, address="127.0.0.1:0",
                        grace_s=1.0, on_drain=servicer.drain)
    await server.start()
    channel = insecure_channel(f"127.0.0.1:{server.bound_port}")
    yield worker_pb2_grpc.WorkerStub(channel), channel, runner
    await channel.close()
    await server.shutdown()


async def test_info_health_and_greedy_steps_over_grpc(worker, tiny_model_dir) -> None:
    stub, channel, runner = worker
    info = await stub.Info(pb.InfoRequest())
    assert (info.block_size, info.num_blocks, info.version) == (16, 128, "v-test")
    assert info.vocab_size == runner.spec.vocab_size and info.max_model_len == 2048
    assert list(info.eos_token_ids) and info.attention_backend == "torch"
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    prompts = make_prompts(info.vocab_size, [3, 40, 100], seed=21)
    jobs = [Job(f"g{i}", p, 10, arrival_step=i) for i, p in enumerate(prompts)]
    mini = MiniScheduler(block_size=info.block_size, num_blocks=info.num_blocks, token_budget=32)
    loop = asyncio.get_running_loop()

    async def call_step(step):
        return await stub.Step(wire.step_to_pb(step))

    def execute_over_grpc(step):  # the harness is synchronous, so it runs in a thread
        reply = asyncio.run_coroutine_threadsafe(call_step(step), loop).result()
        assert reply.step_id == step.step_id and reply.execute_duration_s > 0
        return _result_from_pb(reply)

    done = await loop.run_in_executor(None, mini.run, execute_over_grpc, jobs)
    for i, prompt in enumerate(prompts):
        assert_greedy_matches(hf_greedy(tiny_model_dir, prompt, 10), done[f"g{i}"].output_token_ids)
    # The last job to finish was never followed by a step that names it finished; Reset drops it.
    assert (await stub.Reset(pb.ResetRequest())).num_dropped_requests == 1
    assert (await stub.Reset(pb.ResetRequest())).num_dropped_requests == 0


async def test_bad_step_is_invalid_argument_naming_the_field(worker) -> None:
    stub, _, runner = worker
    bad = pb.StepRequest(new_requests=[pb.NewRequest(
        request_id="x", prompt_token_ids=[1, 2], block_ids=[runner.num_blocks + 5], num_scheduled_tokens=2,
        sampling=pb.SamplingParams(top_p=1.0, repetition_penalty=1.0))])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Step(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block_ids" in err.value.details()
    bad_sampling = pb.StepRequest(new_requests=[pb.NewRequest(
        request_id="y", prompt_token_ids=[1], block_ids=[1], num_scheduled_tokens=1,
        sampling=pb.SamplingParams(top_p=0.0, repetition_penalty=1.0))])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Step(bad_sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()


def _result_from_pb(reply: pb.StepResponse):
    from services.worker.step import RequestResult, StepResult, TokenLogprobs

    return StepResult(reply.step_id, tuple(
        RequestResult(o.request_id, tuple(o.token_ids),
                      tuple(TokenLogprobs(lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs)) for lp in o.logprobs),
                      o.error)
        for o in reply.outputs))


def test_worker_process_serves_and_stops_on_sigterm(tiny_model_dir, unused_tcp_port_factory) -> None:
    port = unused_tcp_port_factory()
    env = {**os.environ, "SWITCHYARD_WORKER_METRICS_PORT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.worker", "--model", str(tiny_model_dir), "--port", str(port),
         "--num-blocks", "64", "--grace-s", "2"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="switchyard.worker.v1.Worker"),
                                      timeout=1).status
                break
            except grpc.RpcError:
                time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, proc.stdout.read() if proc.poll() is not None else ""
        info = worker_pb2_grpc.WorkerStub(channel).Info(pb.InfoRequest(), timeout=5)
        assert info.num_blocks == 64 and info.model == "tiny-llama"
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_process_names_a_missing_model(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "services.worker", "--model", str(tmp_path / "nope"), "--port", "0",
                          "--metrics-port", "0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "model" in out.stderr and "config.json" in out.stderr


async def test_drain_stops_waiting_for_requests_whose_scheduler_went_away(tiny_model_dir) -> None:
    """A worker drains by finishing what it holds; once the Steps stream that sent it is gone (the
    scheduler died or left), nobody can finish or adopt those requests, so the drain ends."""
    runner = ModelRunner(tiny_model_dir, num_blocks=64, block_size=16)
    servicer = WorkerServicer(Executor(runner), version="v-test")
    server = GrpcServer(service_name="worker", register=servicer.register, address="127.0.0.1:0", grace_s=5.0)
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            steps = worker_pb2_grpc.WorkerStub(channel).Steps()
            await steps.write(pb.StepRequest(step_id=1, new_requests=[pb.NewRequest(
                request_id="held", prompt_token_ids=[1, 2, 3], block_ids=[1], num_scheduled_tokens=3,
                sampling=pb.SamplingParams(top_p=1.0, repetition_penalty=1.0))]))
            assert (await steps.read()).step_id == 1
            draining = asyncio.create_task(servicer.drain())
            await asyncio.sleep(0.5)
            assert not draining.done(), "the drain must wait while its scheduler may still finish the request"
            steps.cancel()  # the scheduler goes away
            await asyncio.wait_for(draining, 5.0)
    finally:
        await server.shutdown()
