"""Turn a GGUF file into a Hugging Face model directory (what `make model` serves by default).

The directory holds float32 safetensors (dequantized, so the quality is that of the GGUF's
quantization), `config.json`, `generation_config.json` whose EOS is the file's end-of-turn token,
`tokenizer.json` with the chat template, and `SOURCE.json` saying where the weights came from.
Loading a directory is faster than re-reading the GGUF (no dequantization, no metadata parsing),
and it is what Hugging Face `generate`, our correctness reference, loads too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from shared.gguf_model import GgufModel
from shared.gguf_tokenizer import build_tokenizer

CHECK_QUESTION = "What is the capital of France?"


def _log(message: str) -> None:
    print(f"make_model: {message}", file=sys.stderr, flush=True)


def write_model_dir(gguf_path: Path, out_dir: Path, source: str, license_name: str) -> None:
    """Writes the directory for `gguf_path` into `out_dir` (which must not hold another model)."""
    _log(f"reading {gguf_path}")
    gguf = GgufModel(gguf_path)
    c = gguf.config
    _log(f"{gguf.name}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
         f"{c.num_key_value_heads} KV heads, vocab {c.vocab_size}, context {c.max_position_embeddings}; "
         "dequantizing to float32")
    model = gguf.hf_model(torch.float32)
    model.generation_config.update(
        bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids), pad_token_id=c.pad_token_id,
        do_sample=False,
    )
    tokenizer = build_tokenizer(gguf)
    _log(f"saving to {out_dir}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "SOURCE.json").write_text(json.dumps({
        "name": gguf.name, "source": source, "license": license_name, "gguf": gguf_path.name,
        "note": "weights dequantized to float32 from the GGUF; quality is that of its quantization",
    }, indent=2) + "\n")


@torch.inference_mode()
def check_chat(model_dir: Path, max_new_tokens: int = 24) -> str:
    """Reloads the directory the way a worker does and answers one factual question greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    _log(f"reloaded OK; {CHECK_QUESTION!r} -> {answer!r}")
    return answer
