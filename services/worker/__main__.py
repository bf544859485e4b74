"""`python -m services.worker`: load the model, allocate the KV pool, serve Step until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

import torch

from services.worker.config import WorkerConfig, parse_config
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.null_runner import NullModelRunner
from services.worker.parallel import Layout, follow, init_group, make_stage_groups, send_stop
from services.worker.ranks import (
    check_split,
    die_with_parent,
    free_port,
    start_followers,
    stop_followers,
    watch_followers,
)
from services.worker.servicer import WorkerServicer
from shared.cpu_features import available_cpus
from shared.errors import SwitchyardError
from shared.server import serve
from shared.telemetry import setup_telemetry, start_metrics_server

logger = logging.getLogger("switchyard.worker")


async def run(config: WorkerConfig) -> None:
    telemetry = setup_telemetry("switchyard-worker")
    # One intra-op thread per core this process owns (its affinity): torch's default counts the
    # machine's cores, which oversubscribes a worker pinned to fewer.
    torch.set_num_threads(config.num_threads or available_cpus())
    logger.info("loading %s (%s on %s, quantization %s, %d threads)%s", config.model_dir, config.dtype,
                config.device, config.quantization, torch.get_num_threads(),
                " as a null model (no weights)" if config.null_model else "")
    followers = []
    layout = Layout(config.tensor_parallel_size, config.pipeline_parallel_size, 0)
    if layout.world_size > 1:
        check_split(config.model_dir, layout.tensor_parallel_size, layout.pipeline_parallel_size)  # before any start
        port = free_port()
        followers = start_followers(layout.world_size, port)
        watch_followers(followers)
        logger.info("parallel: tensor %d x pipeline %d; started %d follower ranks, joining the group on port %d",
                    layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.world_size - 1, port)
        init_group(0, layout.world_size, port)
        make_stage_groups(layout)
    if config.null_model:  # computes nothing, so there is no decode graph to capture
        runner = NullModelRunner(config.model_dir, **_runner_args(config))
    else:
        runner = ModelRunner(config.model_dir, cuda_graphs=config.cuda_graphs, **_runner_args(config))
    logger.info(
        "model %s (%s): %d KV blocks of %d tokens (%.1f MiB), attention %s, max_model_len %d",
        runner.spec.name, runner.spec.dtype, runner.num_blocks, runner.block_size, runner.kv_pool.shape.num_bytes / 2**20,
        runner.backend.name, runner.spec.max_model_len,
    )
    if runner.kv_pool.num_host_blocks:
        logger.info("host KV tier: %d blocks (%.1f MiB)", runner.kv_pool.num_host_blocks,
                    runner.kv_pool.num_host_blocks * runner.kv_pool.shape.bytes_per_block / 2**20)
    executor = Executor(runner)
    if not config.null_model:
        executor.grammars.warm_in_background()
    servicer = WorkerServicer(executor, version=config.version, address=config.address)
    start_metrics_server(config.metrics_port, config.host, config.tls)
    await serve(
        service_name="worker", register=servicer.register, address=config.address,
        grace_s=config.grace_s, on_drain=servicer.drain, telemetry=telemetry, tls=config.tls,
    )
    if followers:  # drained: no step is in flight, so the stop message cannot cut one in half
        send_stop()
        stop_followers(followers)


def _runner_args(config: WorkerConfig) -> dict:
    return dict(dtype=config.dtype, device=config.device, block_size=config.block_size,
                num_blocks=config.num_blocks, kv_cache_bytes=config.kv_cache_bytes,
                kv_host_cache_bytes=config.kv_host_cache_bytes, attention_backend=config.attention_backend,
                max_model_len=config.max_model_len, name=config.model_name, quantization=config.quantization,
                tensor_parallel_size=config.tensor_parallel_size, pipeline_parallel_size=config.pipeline_parallel_size,
                parallel_rank=config.parallel_rank)


def run_follower(config: WorkerConfig) -> int:
    """A rank > 0: joins rank 0's group, loads its shard or stage, replays rank 0's steps."""
    die_with_parent()
    layout = Layout(config.tensor_parallel_size, config.pipeline_parallel_size, config.parallel_rank)
    torch.set_num_threads(config.num_threads or available_cpus())
    init_group(layout.rank, layout.world_size, config.parallel_port)
    make_stage_groups(layout)
    runner = ModelRunner(config.model_dir, cuda_graphs=False, **_runner_args(config))
    logger.info("parallel rank %d of %d (stage %d, tensor rank %d) ready: %d KV blocks", layout.rank,
                layout.world_size, layout.stage, layout.tp_rank, runner.num_blocks)
    follow(runner, runner.block_size)  # a broken group exits the process (parallel.exit_rank_lost)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = parse_config(argv)
        if config.parallel_rank > 0:
            return run_follower(config)
        asyncio.run(run(config))
    except (FileNotFoundError, ValueError, SwitchyardError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
