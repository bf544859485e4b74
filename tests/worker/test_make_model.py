"""The generated test model must load offline, have the promised shape and be reproducible."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Loading a local directory must never reach a hub; offline mode makes any attempt fail loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from services.worker.make_model import GAP_PROMPTS, make_model, top2_gaps


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("first") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)


def test_tiny_has_llama_gqa_shape(tiny_model: torch.nn.Module) -> None:
    config = tiny_model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (4, 256)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 4)
    assert config.max_position_embeddings == 2048
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert not config.tie_word_embeddings
    attention = tiny_model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 8 * 32
    assert attention.k_proj.out_features == attention.v_proj.out_features == 4 * 32
    assert all(param.dtype == torch.float32 for param in tiny_model.parameters())


def test_special_token_ids_agree_everywhere(
    tiny_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
) -> None:
    config, generation = tiny_model.config, tiny_model.generation_config
    assert config.vocab_size == len(tokenizer) == 4096
    assert config.bos_token_id == generation.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert generation.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    assert config.pad_token_id == tokenizer.pad_token_id
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_rebuild_is_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    second = make_model("tiny", tmp_path / "tiny-llama")
    assert file_hashes(second) == file_hashes(tiny_dir)
    assert {"model.safetensors", "tokenizer.json"} <= file_hashes(second).keys()


def test_complete_dir_is_skipped(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in tiny_dir.iterdir()}
    assert make_model("tiny", tiny_dir) == tiny_dir
    assert "skipped" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in tiny_dir.iterdir()} == before


def test_unknown_preset_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset"):
        make_model("huge", tmp_path / "huge")


@pytest.mark.parametrize("text", [
    "Hello , world . It's  spaced\tand\nnew-lined.",
    "你好，世界！日本語のテキスト。한국어",
    "emoji 🎉👩‍👩‍👧 and naïve café, Ünïcödé ∑ x²",
    "    def f(self):\n        return {'a': [1, 2]}\n",
])
def test_utf8_round_trip_with_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_roles(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n"
    # Each marker must be one special token, or the model could not learn to emit <|end|>.
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
        assert marker in tokenizer.all_special_tokens


def test_greedy_top2_gap_is_well_separated(
    tiny_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
) -> None:
    gaps = top2_gaps(tiny_model, tokenizer, GAP_PROMPTS[:4], num_tokens=32)
    # Near-ties are where the stack may legitimately diverge from the reference; keep them rare.
    assert min(gaps) > 1e-3
    assert sum(gap < 1e-2 for gap in gaps) <= 0.05 * len(gaps)
    assert torch.isfinite(torch.tensor(gaps)).all()
