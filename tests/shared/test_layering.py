"""The pure cores stay pure: importing one loads nothing of gRPC, asyncio or OpenTelemetry; and no
two modules import each other, even through a chain or under TYPE_CHECKING.

They are synchronous, I/O-free objects with their own unit tests; a stray import (a typed error
that knew its gRPC status, a metrics hook) would tie them to the transport again. Each module is
imported in a fresh interpreter, since this test process has all of those loaded already.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PURE_CORES = (
    "shared.errors",
    "services.scheduler.batcher",
    "services.scheduler.block_manager",
    "services.scheduler.prefix_index",
    "services.scheduler.prefix_claims",
    "services.scheduler.host_tier",
    "services.scheduler.eviction",
    "services.scheduler.batch_wait",
    "services.scheduler.router",
    "services.scheduler.admission",
    "services.scheduler.canary",
    "services.scheduler.autoscale",
    "services.tokenizer.validation",
    "services.tokenizer.stop_checker",
    "services.tokenizer.detokenizer",
    "services.tokenizer.response_cache",
)
TRANSPORT = ("grpc", "asyncio", "opentelemetry")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", PURE_CORES)
def test_a_pure_core_imports_no_transport(module: str) -> None:
    probe = (f"import sys, {module}; "
             f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(TRANSPORT)!r})))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "", f"{module} pulls in {loaded.stdout.strip()}"


def _project_imports(path: Path) -> set[str]:
    """Every project module a file imports, wherever the import sits (TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ("services", "shared"))
    return found


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_not_even_for_the_type_checker() -> None:
    modules = {}
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("shared/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in _project_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the project
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


PROTOBUF_METHODS = {"WhichOneof", "ByteSize", "HasField", "SerializeToString", "ParseFromString", "CopyFrom"}


def test_protobuf_messages_are_built_and_read_only_in_wire_modules() -> None:
    """Servicers may name message types (their generated base classes' signatures) but build and
    take apart messages only through wire.py, so the cores see plain dataclasses."""
    offenders = []
    for path in ROOT.glob("services/**/*.py"):
        if path.name == "wire.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            built = isinstance(owner, ast.Name) and owner.id.endswith("pb") and node.func.attr[:1].isupper()
            if built or node.func.attr in PROTOBUF_METHODS:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}")
    assert offenders == []
