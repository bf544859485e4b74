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
from services.worker.parallel import follow, init_group, send_stop
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
    size = config.tensor_parallel_size
    if size > 1:
        check_split(config.model_dir, size)  # before any process starts
        port = free_port()
        followers = start_followers(size, port)
        watch_followers(followers)
        logger.info("tensor parallel: started %d follower ranks; joining the process group on port %d",
                    size - 1, port)
        init_group(0, size, port)
    if config.null_model:  # computes nothing, so there is no decode graph to capture
        runner = NullModelRunner(config.model_dir, **_runner_args(config))
    else:
        runner = ModelRunner(config.model_dir, cuda_graphs=config.cuda_graphs, tensor_parallel_size=size,
                             **_runner_args(config))
    logger.info(
        "model %s (%s): %d KV blocks of %d tokens (%.1f MiB), attention %s, max_model_len %d",
        runner.spec.name, runner.spec.dtype, runner.num_blocks, runner.block_size, runner.kv_pool.shape.num_bytes / 2**20,
        runner.backend.name, runner.spec.max_model_len,
    )
    if runner.kv_pool.num_host_blocks:
        logger.info("host KV tier: %d blocks (%.1f MiB)", runner.kv_pool.num_host_blocks,
                    runner.kv_pool.num_host_blocks * runner.kv_pool.shape.bytes_per_block / 2**20)
    servicer = WorkerServicer(Executor(runner), version=config.version, address=config.address)
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
                max_model_len=config.max_model_len, name=config.model_name, quantization=config.quantization)


def run_follower(config: WorkerConfig) -> int:
    """A tensor-parallel rank > 0: joins rank 0's group, loads its shard, replays rank 0's steps."""
    die_with_parent()
    rank, size = config.tensor_parallel_rank, config.tensor_parallel_size
    torch.set_num_threads(config.num_threads or available_cpus())
    init_group(rank, size, config.tensor_parallel_port)
    runner = ModelRunner(config.model_dir, cuda_graphs=False, tensor_parallel_rank=rank, tensor_parallel_size=size,
                         **_runner_args(config))
    logger.info("tensor-parallel rank %d of %d ready: %d KV blocks of its heads", rank, size, runner.num_blocks)
    follow(runner, runner.block_size)  # a broken group exits the process (parallel.group_broken)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = parse_config(argv)
        if config.tensor_parallel_rank > 0:
            return run_follower(config)
        asyncio.run(run(config))
    except (FileNotFoundError, ValueError, SwitchyardError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
