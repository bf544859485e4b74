"""The pure cores stay pure: importing one loads nothing of gRPC, asyncio or OpenTelemetry.

They are synchronous, I/O-free objects with their own unit tests; a stray import (a typed error
that knew its gRPC status, a metrics hook) would tie them to the transport again. Each module is
imported in a fresh interpreter, since this test process has all of those loaded already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE_CORES = (
    "shared.errors",
    "services.scheduler.batcher",
    "services.scheduler.block_manager",
    "services.scheduler.prefix_index",
    "services.scheduler.router",
    "services.scheduler.admission",
    "services.scheduler.canary",
    "services.tokenizer.validation",
    "services.tokenizer.stop_checker",
    "services.tokenizer.detokenizer",
)
TRANSPORT = ("grpc", "asyncio", "opentelemetry")


@pytest.mark.parametrize("module", PURE_CORES)
def test_a_pure_core_imports_no_transport(module: str) -> None:
    probe = (f"import sys, {module}; "
             f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(TRANSPORT)!r})))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "", f"{module} pulls in {loaded.stdout.strip()}"
