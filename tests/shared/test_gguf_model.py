"""GGUF loading on the tiny model: weights per quantization type, tokenizer, and the bad-file errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from shared.gguf_model import GgufError, GgufModel, served_model_name
from shared.gguf_tokenizer import build_tokenizer
from tests.conftest import REPO_ROOT
from tests.gguf_files import write_bad_gguf, write_llama_gguf

# Largest |dequantized - original| relative to the tensor's largest |value| that each type may
# show (4-bit blocks keep ~1/16 of the block's range; 8-bit ~1/256); F32 must round-trip exactly.
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q4_0": 0.2, "Q4_1": 0.2}
TEXTS = ["def main():\n    return 42\n", "The quick brown fox", "你好，世界！🎉", "  two  spaces 123"]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tiny_f32(tiny_model_dir, gguf_dir) -> Path:
    path = gguf_dir / "tiny-f32.gguf"
    write_llama_gguf(tiny_model_dir, path, "F32")
    return path


@pytest.mark.parametrize("qtype", sorted(TOLERANCE))
def test_each_type_dequantizes_to_the_original_weights(tiny_model_dir, gguf_dir, qtype) -> None:
    path = gguf_dir / f"tiny-{qtype}.gguf"
    original = write_llama_gguf(tiny_model_dir, path, qtype)
    loaded = GgufModel(path).state_dict()
    assert set(loaded) == set(original)
    for name, tensor in original.items():
        want = tensor.float().numpy()
        got = loaded[name]
        assert got.shape == want.shape, name
        error = float(np.abs(got - want).max()) / float(np.abs(want).max())
        assert error <= TOLERANCE[qtype], f"{qtype} {name}: relative error {error:.4f}"
    # Q and K rows come back in Hugging Face order (the permutation is undone), not merely close.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert np.corrcoef(loaded[q].ravel(), original[q].float().numpy().ravel())[0, 1] > 0.95


def test_f32_gguf_gives_the_directory_logits(tiny_model_dir, tiny_f32) -> None:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from_dir = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, local_files_only=True).eval()
    from_gguf = GgufModel(tiny_f32).hf_model()
    ids = torch.tensor([[1, 17, 300, 5, 999, 42, 7]])
    with torch.inference_mode():
        assert torch.equal(from_dir(ids).logits, from_gguf(ids).logits)


def test_tokenizer_and_chat_template_match_the_directory(tiny_model_dir, tiny_f32) -> None:
    gguf = GgufModel(tiny_f32)
    want = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    got = build_tokenizer(gguf)
    for text in TEXTS:
        assert got.encode(text) == want.encode(text), text
        assert got.decode(got.encode(text), skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "Hi"}]
    assert got.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert gguf.config.eos_token_ids == (2, want.convert_tokens_to_ids("<|end|>"))
    assert served_model_name(tiny_f32) == "tiny-f32" and served_model_name(tiny_model_dir) == "tiny-llama"


def bad_files(tmp: Path, tiny_f32: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its error must say)."""
    data = tiny_f32.read_bytes()
    cases = {
        "not gguf": ("not-gguf.gguf", b"PK\x03\x04 this is a zip, not a model" * 4, "not a GGUF file"),
        "empty": ("empty.gguf", b"", "not a GGUF file"),
        "truncated metadata": ("cut-early.gguf", data[:2000], "truncated or corrupt"),
        "truncated tensors": ("cut-late.gguf", data[: len(data) * 2 // 3], "truncated"),
        "future version": ("v9.gguf", b"GGUF" + (9).to_bytes(4, "little") + data[8:], "GGUF version 9"),
    }
    out = {}
    for name, (file_name, content, message) in cases.items():
        (tmp / file_name).write_bytes(content)
        out[name] = (tmp / file_name, message)
    write_bad_gguf(tmp / "gpt2.gguf", architecture="gpt2")
    out["architecture"] = (tmp / "gpt2.gguf", "architecture 'gpt2' is not supported")
    write_bad_gguf(tmp / "q2k.gguf", qtype="Q2_K")
    out["quantization"] = (tmp / "q2k.gguf", "quantization type Q2_K, which is not supported")
    out["missing"] = (tmp / "nowhere.gguf", "no such file")
    return out


def test_each_bad_file_is_one_error_naming_the_file(tmp_path, tiny_f32) -> None:
    for case, (path, message) in bad_files(tmp_path, tiny_f32).items():
        with pytest.raises(GgufError) as raised:
            GgufModel(path)
        text = str(raised.value)
        assert text.startswith(f"model: {path}: ") and message in text and "\n" not in text, (case, text)


@pytest.mark.parametrize("service", ["worker", "tokenizer"])
def test_services_refuse_a_bad_gguf_at_start_with_one_line(tmp_path, tiny_f32, service) -> None:
    cases = bad_files(tmp_path, tiny_f32)
    for case in ("truncated metadata", "architecture", "quantization"):
        path, message = cases[case]
        result = subprocess.run(
            [sys.executable, "-m", f"services.{service}", "--model", str(path), "--port", "0", "--metrics-port", "0",
             *(["--http-port", "0"] if service == "tokenizer" else [])],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, (service, case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (service, case, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and f"model: {path}: " in errors[0] and message in errors[0], (service, case, errors)


def test_int8_calibration_reads_the_vocabulary_inside_a_gguf(tiny_model_dir, tiny_f32) -> None:
    from services.worker.calibration import tokenizer_for  # noqa: PLC0415

    text = "Calibration text: the quick brown fox."
    assert tokenizer_for(tiny_f32).encode(text) == tokenizer_for(tiny_model_dir).encode(text)
