"""Worker configuration: command-line flags, each with an environment-variable fallback.

This is the only worker module that reads the environment.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from shared.config import env_bool, env_int, env_str
from shared.tls import TlsConfig, add_tls_arguments, tls_from_args


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str
    host: str
    port: int
    metrics_port: int
    dtype: str
    device: str
    block_size: int
    num_blocks: int | None
    kv_cache_bytes: int
    attention_backend: str
    version: str
    model_name: str | None
    max_model_len: int | None
    num_threads: int
    grace_s: float
    quantization: str = "none"
    kv_host_cache_bytes: int = 0  # 0: no host tier
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    parallel_rank: int = 0  # > 0: a follower rank that rank 0 started (no gRPC, no metrics)
    parallel_port: int = 0  # rank 0's process-group port, given to the followers
    null_model: bool = False  # serve with NullModelRunner: no weights, deterministic tokens
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (CUDA + triton backend only)
    tls: TlsConfig = TlsConfig()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_config(argv: list[str] | None = None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m services.worker", description="Switchyard worker")
    p.add_argument("--model", default=env_str("SWITCHYARD_MODEL", "models/smollm2-135m-instruct"),
                   help="model directory (config.json, safetensors, tokenizer) or a Llama-family .gguf file "
                        "[SWITCHYARD_MODEL]")
    p.add_argument("--host", default=env_str("SWITCHYARD_WORKER_HOST", "127.0.0.1"),
                   help="listen address; loopback unless you mean otherwise [SWITCHYARD_WORKER_HOST]")
    p.add_argument("--port", type=int, default=env_int("SWITCHYARD_WORKER_PORT", 50061, min_value=0),
                   help="gRPC port [SWITCHYARD_WORKER_PORT]")
    p.add_argument("--metrics-port", type=int, default=env_int("SWITCHYARD_WORKER_METRICS_PORT", 9111, min_value=0),
                   help="Prometheus /metrics port, 0 disables [SWITCHYARD_WORKER_METRICS_PORT]")
    p.add_argument("--dtype", default=env_str("SWITCHYARD_DTYPE", "auto"),
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype; auto: bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX), else "
                        "float32 (token-identical to Hugging Face); bfloat16 or float16 on CUDA [SWITCHYARD_DTYPE]")
    p.add_argument("--quantization", default=env_str("SWITCHYARD_QUANTIZATION", "none"), choices=["none", "int8"],
                   help="int8: int8 weights with per-channel scales and SmoothQuant factors for the QKV, output, "
                        "gate/up projections and the head (down stays in --dtype); faster on CPUs, perplexity "
                        "within 3%% of float32 [SWITCHYARD_QUANTIZATION]")
    p.add_argument("--device", default=env_str("SWITCHYARD_DEVICE", "cpu"), help="torch device [SWITCHYARD_DEVICE]")
    p.add_argument("--block-size", type=int, default=env_int("SWITCHYARD_BLOCK_SIZE", 16, min_value=1),
                   help="tokens per KV block [SWITCHYARD_BLOCK_SIZE]")
    p.add_argument("--num-blocks", type=int, default=env_int("SWITCHYARD_NUM_BLOCKS", 0, min_value=0),
                   help="KV blocks incl. the null block; 0 sizes the pool from --kv-cache-mib [SWITCHYARD_NUM_BLOCKS]")
    p.add_argument("--kv-cache-mib", type=int, default=env_int("SWITCHYARD_KV_CACHE_MIB", 256, min_value=1),
                   help="KV pool memory budget in MiB [SWITCHYARD_KV_CACHE_MIB]")
    p.add_argument("--kv-host-cache-mib", type=int, default=env_int("SWITCHYARD_KV_HOST_CACHE_MIB", 0, min_value=0),
                   help="host-memory KV tier (L2) in MiB: device blocks the scheduler evicts are copied here "
                        "and prefix hits in it copied back instead of recomputed; 0 = off "
                        "[SWITCHYARD_KV_HOST_CACHE_MIB]")
    p.add_argument("--attention-backend", default=env_str("SWITCHYARD_ATTENTION_BACKEND", "auto"),
                   choices=["auto", "torch", "triton"], help="paged attention kernels [SWITCHYARD_ATTENTION_BACKEND]")
    p.add_argument("--version", dest="version_label", default=env_str("SWITCHYARD_MODEL_VERSION", "v1"),
                   help="model version label for cache keys and pools [SWITCHYARD_MODEL_VERSION]")
    p.add_argument("--model-name", default=env_str("SWITCHYARD_MODEL_NAME", "") or None,
                   help="served model name; default the directory name or file stem [SWITCHYARD_MODEL_NAME]")
    p.add_argument("--max-model-len", type=int, default=env_int("SWITCHYARD_MAX_MODEL_LEN", 0, min_value=0),
                   help="cap on prompt + output tokens; 0 uses the model's [SWITCHYARD_MAX_MODEL_LEN]")
    p.add_argument("--num-threads", type=int, default=env_int("SWITCHYARD_TORCH_THREADS", 0, min_value=0),
                   help="torch intra-op threads; 0: one per core this process may run on [SWITCHYARD_TORCH_THREADS]")
    p.add_argument("--grace-s", type=float, default=float(env_str("SWITCHYARD_GRACE_S", "10")),
                   help="seconds in-flight steps get on shutdown [SWITCHYARD_GRACE_S]")
    p.add_argument("--tensor-parallel-size", type=int,
                   default=env_int("SWITCHYARD_TENSOR_PARALLEL_SIZE", 1, min_value=1),
                   help="ranks (processes) one model is split across by attention heads and MLP columns; "
                        "this process is rank 0 and starts the others (gloo) "
                        "[SWITCHYARD_TENSOR_PARALLEL_SIZE]")
    p.add_argument("--pipeline-parallel-size", type=int,
                   default=env_int("SWITCHYARD_PIPELINE_PARALLEL_SIZE", 1, min_value=1),
                   help="stages the model's layers are split into, each on its own ranks (x --tensor-parallel-size); "
                        "a step's batch flows through them as micro-batches [SWITCHYARD_PIPELINE_PARALLEL_SIZE]")
    # Set by rank 0 on the followers it starts; never by hand.
    p.add_argument("--parallel-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--parallel-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--null-model", action=argparse.BooleanOptionalAction,
                   default=env_bool("SWITCHYARD_NULL_MODEL", False),
                   help="no weights, no compute: token t is followed by t+1; measures the pipeline alone "
                        "[SWITCHYARD_NULL_MODEL]")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   default=env_bool("SWITCHYARD_CUDA_GRAPHS", True),
                   help="replay decode steps from CUDA graphs captured per padded batch size; only on "
                        "CUDA with the triton backend [SWITCHYARD_CUDA_GRAPHS]")
    add_tls_arguments(p)
    a = p.parse_args(argv)
    for flag, value in (("--tensor-parallel-size", a.tensor_parallel_size),
                        ("--pipeline-parallel-size", a.pipeline_parallel_size)):
        if value < 1:
            p.error(f"{flag}: must be >= 1, got {value}")
        if value > 1 and a.null_model:
            p.error(f"{flag}: the null model computes nothing to split; use 1 with --null-model")
    return WorkerConfig(
        model_dir=a.model, host=a.host, port=a.port, metrics_port=a.metrics_port, dtype=a.dtype,
        device=a.device, block_size=a.block_size, num_blocks=a.num_blocks or None,
        kv_cache_bytes=a.kv_cache_mib * 2**20, kv_host_cache_bytes=a.kv_host_cache_mib * 2**20,
        attention_backend=a.attention_backend,
        version=a.version_label, model_name=a.model_name, max_model_len=a.max_model_len or None,
        num_threads=a.num_threads, grace_s=a.grace_s, quantization=a.quantization, null_model=a.null_model, cuda_graphs=a.cuda_graphs,
        tls=tls_from_args(a), tensor_parallel_size=a.tensor_parallel_size,
        pipeline_parallel_size=a.pipeline_parallel_size, parallel_rank=a.parallel_rank, parallel_port=a.parallel_port,
    )
