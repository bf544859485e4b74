"""Llama-family models read straight from a GGUF file (llama.cpp's format), dequantized at load.

`--model` may name a `.gguf` file instead of a Hugging Face directory: the worker takes the weights
and the architecture from it, the front door the tokenizer and the chat template, and `make model`
turns one into a directory. The file is checked before anything else touches it, so a bad file is
one line naming the file and what is wrong (`GgufError`), never a traceback from inside a library.

Quantized tensors are dequantized to float32 with the `gguf` package's reference code and then
cast to the serving dtype: the quality is that of the quantized file, the speed that of the dtype.
llama.cpp's converter permutes the rows of Q and K for its rotary layout; `_unpermute` undoes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
# Tensor types we dequantize. The first six are tested (tests/shared/test_gguf_model.py); the
# K-quants go through the same `gguf` reference code and are what Q4_K_M files are made of.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


class GgufError(ValueError):
    """A GGUF file that cannot be served; the message is one line naming the file."""

    def __init__(self, path: str | Path, what: str) -> None:
        super().__init__(f"model: {path}: {what}")


def is_gguf_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def served_model_name(path: str | Path) -> str:
    """The name a model is served under by default: the directory's name or the file's stem."""
    path = Path(path)
    return path.stem if is_gguf_path(path) else path.name


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama parameter that a GGUF tensor holds, or None if it has none."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    return None


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (pairs of rotary halves interleaved per head)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@dataclass(frozen=True)
class GgufConfig:
    """The Llama hyper-parameters a GGUF file declares (the subset we serve)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


class GgufModel:
    """One validated GGUF file: its config, tokenizer metadata and (lazily) its weights."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader  # noqa: PLC0415 (slow import; only GGUF users pay it)

        self.path = Path(path)
        _check_header(self.path)
        try:
            self._reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
            # The header parses but the metadata or tensor table runs off the end or is garbage.
            size = self.path.stat().st_size
            raise GgufError(self.path, f"truncated or corrupt: its metadata and tensor table do not parse "
                                       f"within its {size} bytes ({type(e).__name__})") from None
        self.architecture = str(self.field("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise GgufError(self.path, f"architecture {self.architecture!r} is not supported "
                                       f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self._check_tensors()
        self.config = self._read_config()
        self.name = str(self.field("general.name", "") or self.path.stem)
        self.chat_template: str | None = self.field("tokenizer.chat_template", None)

    def field(self, key: str, default: Any = ...) -> Any:
        found = self._reader.fields.get(key)
        if found is None:
            if default is ...:
                raise GgufError(self.path, f"metadata key {key!r} is missing")
            return default
        value = found.contents()
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def _check_tensors(self) -> None:
        size = self.path.stat().st_size
        for tensor in self._reader.tensors:
            type_name = tensor.tensor_type.name
            if type_name not in SUPPORTED_TENSOR_TYPES:
                raise GgufError(self.path, f"tensor {tensor.name!r} has quantization type {type_name}, "
                                           f"which is not supported (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
            if tensor.data_offset + tensor.n_bytes > size:
                raise GgufError(self.path, f"truncated: tensor {tensor.name!r} ends at byte "
                                           f"{tensor.data_offset + tensor.n_bytes}, the file has {size}")
            if hf_tensor_name(tensor.name) is None:
                raise GgufError(self.path, f"tensor {tensor.name!r} is not part of a plain Llama model "
                                           "(rope scaling tensors and biases are not supported)")

    def _read_config(self) -> GgufConfig:
        arch = self.architecture
        names = {tensor.name for tensor in self._reader.tensors}
        if "token_embd.weight" not in names:
            raise GgufError(self.path, "tensor 'token_embd.weight' is missing")
        scaling = self.field(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", ""):
            raise GgufError(self.path, f"rope scaling {scaling!r} is not supported")
        hidden = int(self.field(f"{arch}.embedding_length"))
        num_heads = int(self.field(f"{arch}.attention.head_count"))
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        vocab_size = int(self.field(f"{arch}.vocab_size", 0) or (len(tokens.data) if tokens else 0))
        if vocab_size <= 0:
            raise GgufError(self.path, "vocabulary size is unknown (no llama.vocab_size, no tokenizer)")
        eos = [self.field("tokenizer.ggml.eos_token_id", None), self.field("tokenizer.ggml.eot_token_id", None)]
        return GgufConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(self.field(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(self.field(f"{arch}.block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(self.field(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(self.field(f"{arch}.attention.key_length", hidden // num_heads)),
            max_position_embeddings=int(self.field(f"{arch}.context_length")),
            rms_norm_eps=float(self.field(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.field(f"{arch}.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=_opt_int(self.field("tokenizer.ggml.bos_token_id", None)),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            pad_token_id=_opt_int(self.field("tokenizer.ggml.padding_token_id", None)),
        )

    def hf_config(self):  # noqa: ANN201 (transformers type)
        from transformers import LlamaConfig  # noqa: PLC0415

        c = self.config
        return LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_ids[0] if c.eos_token_ids else None, pad_token_id=c.pad_token_id,
            dtype="float32",
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor dequantized to float32 under its Hugging Face name, Q/K rows un-permuted."""
        from gguf.quants import dequantize  # noqa: PLC0415

        c = self.config
        weights: dict[str, np.ndarray] = {}
        for tensor in self._reader.tensors:
            shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
            # A copy: float32 tensors come back as read-only views of the memory-mapped file.
            array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
            if tensor.name.endswith("attn_q.weight"):
                array = _unpermute(array, c.num_attention_heads)
            elif tensor.name.endswith("attn_k.weight"):
                array = _unpermute(array, c.num_key_value_heads)
            weights[hf_tensor_name(tensor.name)] = array
        return weights

    def hf_model(self, dtype: Any = None):  # noqa: ANN201 (transformers type)
        """A `LlamaForCausalLM` holding this file's weights (float32 unless `dtype` says otherwise)."""
        import torch  # noqa: PLC0415
        from transformers import LlamaForCausalLM  # noqa: PLC0415

        model = LlamaForCausalLM(self.hf_config())
        tensors = {name: torch.from_numpy(array) for name, array in self.state_dict().items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        allowed_missing = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        if set(missing) - allowed_missing or unexpected:
            raise GgufError(self.path, f"tensors missing {sorted(set(missing) - allowed_missing)[:3]}, "
                                       f"unexpected {sorted(unexpected)[:3]}")
        model.tie_weights()
        return model.to(dtype or torch.float32).eval()


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _check_header(path: Path) -> None:
    if not path.is_file():
        raise GgufError(path, "no such file")
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise GgufError(path, f"not a GGUF file (only {len(head)} bytes)")
    if head[:4] != GGUF_MAGIC:
        raise GgufError(path, f"not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise GgufError(path, f"GGUF version {version} is not supported (2 or 3)")
