"""The real scheduler core driving the real worker core in one process: the scheduler's Batcher
plans each step, the worker's Executor runs it, both wire conversions in between, no gRPC. For
tests of features that live on both sides (speculative decoding, constrained decoding)."""

from __future__ import annotations

from services.scheduler import wire as scheduler_wire
from services.scheduler.batcher import Batcher
from services.scheduler.block_manager import BlockManager
from services.scheduler.request import RequestStatus
from services.scheduler.speculation import NgramProposer
from services.worker import wire as worker_wire
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner


def serve(runner: ModelRunner, requests: list, *, num_speculative_tokens: int = 0,
          max_num_batched_tokens: int = 64, num_blocks: int | None = None) -> Batcher:
    """Runs scheduler `Request`s to their finish, one step at a time; checks after each step that the
    two block tables agree, and at the end that every block came back."""
    manager = BlockManager(num_blocks or runner.num_blocks, runner.block_size, "v1")
    batcher = Batcher(manager, max_model_len=runner.spec.max_model_len, eos_token_ids=runner.spec.eos_token_ids,
                      max_num_batched_tokens=max_num_batched_tokens,
                      proposer=NgramProposer(num_speculative_tokens) if num_speculative_tokens else None)
    executor = Executor(runner)
    for request in requests:
        batcher.add(request)
    while batcher.has_work():
        plan = batcher.schedule()
        result = executor.execute(worker_wire.step_from_pb(scheduler_wire.plan_to_pb(plan)))
        batcher.update(plan, scheduler_wire.outputs_from_pb(worker_wire.result_to_pb(result)))
        for rid, state in executor.requests.items():
            request = batcher.get(rid)
            if request is not None and request.status is RequestStatus.RUNNING:
                assert manager.block_ids(rid) == state.block_ids, f"{rid}: the block tables differ"
                assert request.num_computed_tokens == state.num_computed_tokens
    assert manager.num_blocks_used == 0, "blocks still held after every request finished"
    return batcher
