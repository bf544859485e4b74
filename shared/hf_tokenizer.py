"""The model's Hugging Face tokenizer, from a model directory or a GGUF file (never a hub).

The front door encodes and decodes with it; the worker builds its grammar compiler's vocabulary
from it (services/worker/grammar.py), so both read one tokenizer the one way.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.gguf_model import GgufModel, is_gguf_path
from shared.gguf_tokenizer import build_tokenizer


def load_tokenizer(model_path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(model_path)
    if is_gguf_path(path):
        return build_tokenizer(GgufModel(path))  # validates first: a bad file is one GgufError line
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model: {path} has no config.json (run `make model`?)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
