"""Real services in one process: two workers, a scheduler and (optionally) the front door, each a
grpc.aio server on 127.0.0.1, talking over real gRPC. Used by service-level tests; the end-to-end
suite starts separate processes instead."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from switchyard.api.v1 import generation_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.fleet import Fleet, FleetConfig
from services.scheduler.router import PoolConfig
from services.scheduler.leadership import Leadership
from services.scheduler.servicer import AdminServicer, SchedulerServicer
from services.tokenizer.codec import Codec
from services.tokenizer.frontend import Frontend
from services.tokenizer.response_cache import ResponseCache
from services.tokenizer.scheduler_client import SchedulerClient
from services.tokenizer.servicer import GenerationServicer
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.servicer import WorkerServicer
from shared.channel import insecure_channel
from shared.server import GrpcServer

BLOCK_SIZE = 16


@dataclass(frozen=True)
class PoolSpec:
    name: str
    version: str
    weight: float
    model_dir: Path
    num_workers: int = 1


class Stack:
    def __init__(self, model_dir, num_blocks: int = 512, max_num_batched_tokens: int = 256,
                 front_door: bool = False, num_workers: int = 2, pools: tuple[PoolSpec, ...] = (),
                 response_cache: ResponseCache | None = None, **fleet_kw) -> None:
        """`pools` replaces the default pool of `num_workers` workers on `model_dir`; `response_cache`
        goes to the front door."""
        self.response_cache = response_cache
        self.model_dir = model_dir
        self.pool_specs = pools or (PoolSpec("default", "v1", 1.0, model_dir, num_workers),)
        self.num_blocks = num_blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.front_door = front_door
        self.num_workers = num_workers
        self.fleet_kw = fleet_kw
        self.workers: list[GrpcServer] = []
        self.servers: list[GrpcServer] = []

    async def _serve(self, name: str, register, on_drain=None) -> GrpcServer:
        server = GrpcServer(service_name=name, register=register, address="127.0.0.1:0", grace_s=0.5,
                            on_drain=on_drain)
        await server.start()
        self.servers.append(server)
        return server

    async def __aenter__(self) -> "Stack":
        pools = []
        for spec in self.pool_specs:
            addresses = []
            for _ in range(spec.num_workers):
                runner = ModelRunner(spec.model_dir, num_blocks=self.num_blocks, block_size=BLOCK_SIZE)
                servicer = WorkerServicer(Executor(runner), version=spec.version)
                self.workers.append(await self._serve("worker", servicer.register, servicer.drain))
                addresses.append(f"127.0.0.1:{self.workers[-1].bound_port}")
            pools.append(PoolConfig(spec.name, spec.version, spec.weight, tuple(addresses)))
        self.addresses = [a for pool in pools for a in pool.worker_addresses]
        self.fleet = Fleet(FleetConfig(pools=tuple(pools), max_num_batched_tokens=self.max_num_batched_tokens,
                                       **{"probe_interval_s": 0.2, "router_seed": 0, **self.fleet_kw}))
        await self.fleet.start(wait_s=30)
        leadership = Leadership.leading(self.fleet)
        servicer, admin = SchedulerServicer(leadership), AdminServicer(leadership)
        self.scheduler = await self._serve("scheduler", lambda server: servicer.register(server) + admin.register(server),
                                           servicer.drain)
        self.scheduler_address = f"127.0.0.1:{self.scheduler.bound_port}"
        self.channel = insecure_channel(self.scheduler_address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.admin = scheduler_pb2_grpc.SchedulerAdminStub(self.channel)
        if self.front_door:
            self.scheduler_client = SchedulerClient(self.scheduler_address)
            self.frontend = Frontend(Codec(self.model_dir), self.scheduler_client, model_name="tiny-llama",
                                     response_cache=self.response_cache)
            generation = GenerationServicer(self.frontend, version="v1", max_request_bytes=64 * 1024)
            self.tokenizer = await self._serve("tokenizer", generation.register)
            self.api_channel = insecure_channel(f"127.0.0.1:{self.tokenizer.bound_port}")
            self.api = generation_pb2_grpc.GenerationStub(self.api_channel)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.front_door:
            await self.api_channel.close()
            await self.scheduler_client.close()
        await self.channel.close()
        for server in reversed(self.servers):
            if server is not None and not server.shutting_down:
                await server.shutdown()
        await self.fleet.stop()
