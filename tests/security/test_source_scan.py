"""No deserialisation of code-carrying formats, and no eval, anywhere a request can reach.

The scan reads the syntax tree of every module under services/ and shared/ (the request path:
front door, scheduler, worker, and what they share) and fails on pickle-family imports, on
`torch.load`, `numpy.load(..., allow_pickle=True)`, `yaml.load` without a safe loader, and on the
builtins that run strings as code. The scanner is itself tested on snippets that contain each
pattern, so a scanner that silently stopped finding things would fail here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUEST_PATH_DIRS = ("services", "shared")
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib",
                     "jsonpickle"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def findings(source: str, filename: str = "<snippet>") -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FORBIDDEN_BUILTINS or name in {f"builtins.{b}" for b in FORBIDDEN_BUILTINS}:
                found.append(f"{where}: {name}()")
            elif name.endswith("torch.load") or name == "load" and isinstance(node.func, ast.Name):
                found.append(f"{where}: {name}()")
            elif name.endswith(("numpy.load", "np.load")):
                allow = _keyword(node, "allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False) and allow is not None:
                    found.append(f"{where}: {name}(allow_pickle=...)")
            elif name.endswith("yaml.load") or name.endswith("yaml.unsafe_load"):
                loader = _keyword(node, "Loader")
                if name.endswith("unsafe_load") or loader is None or "Safe" not in _dotted(loader):
                    found.append(f"{where}: {name}() without a safe loader")
    return found


def request_path_modules() -> list[Path]:
    return sorted(p for d in REQUEST_PATH_DIRS for p in (REPO_ROOT / d).rglob("*.py")
                  if "proto" not in p.relative_to(REPO_ROOT).parts[:2])


def test_request_path_has_no_pickle_marshal_torch_load_or_eval() -> None:
    modules = request_path_modules()
    assert len(modules) > 40, "the scan found too few modules to be scanning the right tree"
    found = [f for path in modules for f in findings(path.read_text(), str(path.relative_to(REPO_ROOT)))]
    assert not found, "forbidden on a request path:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import pickle", "import cPickle as p", "from pickle import loads", "import marshal", "import dill",
    "from joblib import load", "eval(text)", "exec(code)", "builtins.eval('1')", "compile(s, 'f', 'exec')",
    "torch.load(buf)", "import torch\nx = torch.load(f, weights_only=True)", "np.load(f, allow_pickle=True)",
    "numpy.load(f, allow_pickle=flag)", "yaml.load(s)", "yaml.load(s, Loader=yaml.Loader)", "yaml.unsafe_load(s)",
    "__import__('os')",
])
def test_the_scanner_finds_each_pattern(snippet: str) -> None:
    assert findings(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import json\njson.loads(s)", "from safetensors.torch import load_file\nload_file(p)", "np.load(f)",
    "np.load(f, allow_pickle=False)", "yaml.load(s, Loader=yaml.SafeLoader)", "model.eval()", "x.compile_ok()",
])
def test_the_scanner_leaves_safe_code_alone(snippet: str) -> None:
    assert not findings(snippet), snippet
