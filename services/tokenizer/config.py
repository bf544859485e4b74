"""Front-door configuration: flags with environment fallbacks. The only module here that reads
the environment."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from shared.config import env_float, env_int, env_str


@dataclass(frozen=True)
class TokenizerConfig:
    model_dir: str
    model_name: str | None
    scheduler_address: str
    host: str
    port: int
    http_host: str
    http_port: int
    metrics_port: int
    max_request_bytes: int
    version: str
    grace_s: float

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_config(argv: list[str] | None = None) -> TokenizerConfig:
    p = argparse.ArgumentParser(prog="python -m services.tokenizer", description="Switchyard front door")
    p.add_argument("--model", default=env_str("SWITCHYARD_MODEL", "models/tiny-llama"),
                   help="model directory holding tokenizer.json and the chat template [SWITCHYARD_MODEL]")
    p.add_argument("--model-name", default=env_str("SWITCHYARD_MODEL_NAME", "") or None,
                   help="served model name; default the directory name [SWITCHYARD_MODEL_NAME]")
    p.add_argument("--scheduler", default=env_str("SWITCHYARD_SCHEDULER_ADDRESS", "127.0.0.1:50052"),
                   help="scheduler address [SWITCHYARD_SCHEDULER_ADDRESS]")
    p.add_argument("--host", default=env_str("SWITCHYARD_TOKENIZER_HOST", "127.0.0.1"),
                   help="gRPC listen host [SWITCHYARD_TOKENIZER_HOST]")
    p.add_argument("--port", type=int, default=env_int("SWITCHYARD_TOKENIZER_PORT", 50051, min_value=0),
                   help="gRPC port [SWITCHYARD_TOKENIZER_PORT]")
    p.add_argument("--http-host", default=env_str("SWITCHYARD_HTTP_HOST", "127.0.0.1"),
                   help="OpenAI-compatible HTTP host [SWITCHYARD_HTTP_HOST]")
    p.add_argument("--http-port", type=int, default=env_int("SWITCHYARD_HTTP_PORT", 8000, min_value=0),
                   help="OpenAI-compatible HTTP port; 0 disables [SWITCHYARD_HTTP_PORT]")
    p.add_argument("--metrics-port", type=int, default=env_int("SWITCHYARD_TOKENIZER_METRICS_PORT", 9101, min_value=0),
                   help="Prometheus /metrics port; 0 disables [SWITCHYARD_TOKENIZER_METRICS_PORT]")
    p.add_argument("--max-request-bytes", type=int,
                   default=env_int("SWITCHYARD_MAX_REQUEST_BYTES", 1 << 20, min_value=1024),
                   help="largest accepted request [SWITCHYARD_MAX_REQUEST_BYTES]")
    p.add_argument("--version", dest="version_label", default=env_str("SWITCHYARD_MODEL_VERSION", "v1"),
                   help="model version label reported by GetModelInfo [SWITCHYARD_MODEL_VERSION]")
    p.add_argument("--grace-s", type=float, default=env_float("SWITCHYARD_GRACE_S", 10.0))
    a = p.parse_args(argv)
    return TokenizerConfig(
        model_dir=a.model, model_name=a.model_name, scheduler_address=a.scheduler, host=a.host, port=a.port,
        http_host=a.http_host, http_port=a.http_port, metrics_port=a.metrics_port,
        max_request_bytes=a.max_request_bytes, version=a.version_label, grace_s=a.grace_s,
    )
