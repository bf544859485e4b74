"""GGUF files for tests, written with the `gguf` package the way llama.cpp's converter writes them.

`write_llama_gguf` turns a Hugging Face Llama directory (the tiny test model) into a GGUF file
whose 2-D weights are quantized to a chosen type, with Q/K rows permuted for llama.cpp's rotary
layout and the tokenizer stored as `tokenizer.ggml.*` metadata: the loader must undo all of it.
The other writers make the bad files whose start-up errors are tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.torch import load_file

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K permutation (what its HF-to-GGUF converter applies)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tokenizer(writer: GGUFWriter, model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in data["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_bos_token_id(vocab[tokenizer_config["bos_token"]])
    eos_ids = generation["eos_token_id"]
    writer.add_eos_token_id(eos_ids[0])
    if len(eos_ids) > 1:
        writer.add_eot_token_id(eos_ids[1])
    writer.add_pad_token_id(vocab[tokenizer_config["pad_token"]])
    writer.add_add_bos_token(True)
    template = model_dir / "chat_template.jinja"
    writer.add_chat_template(template.read_text() if template.exists() else tokenizer_config["chat_template"])


def write_llama_gguf(model_dir: Path, out: Path, qtype: str) -> dict[str, torch.Tensor]:
    """Writes `model_dir` as a GGUF with 2-D weights in `qtype`; returns the original weights."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    writer = GGUFWriter(out, "llama")
    writer.add_name(model_dir.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, model_dir)
    quant = GGMLQuantizationType[qtype]
    for name, tensor in sorted(weights.items()):
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = permute(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = permute(array, config["num_key_value_heads"])
        if array.ndim == 1 or quant == GGMLQuantizationType.F32:  # norms stay F32, as in llama.cpp
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
        elif array.shape[-1] % GGML_QUANT_SIZES[quant][0]:
            # Rows that are not whole blocks (tiny's 688-wide down_proj in 32-blocks): llama.cpp
            # falls back to a plain type for such tensors, and so do we.
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), quantize(array, quant), raw_dtype=quant)
    _finish(writer)
    return weights


def write_bad_gguf(out: Path, *, architecture: str = "llama", qtype: str = "F32") -> None:
    """A minimal GGUF with one tensor: a bad architecture or an unsupported tensor type."""
    writer = GGUFWriter(out, architecture)
    writer.add_block_count(1)
    quant = GGMLQuantizationType[qtype]
    if quant == GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((4, 256), dtype=np.float32))
    else:  # raw blocks of the right size; their content never matters, the type is refused first
        block_elems, block_bytes = {"Q2_K": (256, 84), "IQ2_XXS": (256, 66)}[qtype]
        writer.add_tensor("token_embd.weight", np.zeros((4, 256 // block_elems * block_bytes), dtype=np.uint8),
                          raw_dtype=quant)
    _finish(writer)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
