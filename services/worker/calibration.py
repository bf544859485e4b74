"""Activation ranges for int8: one float forward over a fixed text when the worker loads.

SmoothQuant (see `linear.smoothing_scales`) needs, per projection, the largest magnitude each
input channel takes on real text. The text ships with the worker (`data/calibration.txt`: prose,
chat turns, code and numbers, written for this purpose), so a model quantizes the same way on
every start and nothing is fetched. A forward of ~400 tokens on the Hugging Face model costs well
under a second for the default model.
"""

from __future__ import annotations

from pathlib import Path

import torch

CALIBRATION_TEXT = Path(__file__).with_name("data") / "calibration.txt"


def tokenizer_for(model_dir: str | Path):  # noqa: ANN201 (a transformers tokenizer)
    """The model's own tokenizer: its tokenizer files, or the vocabulary inside its GGUF."""
    from shared.gguf_model import GgufModel, is_gguf_path  # noqa: PLC0415
    from shared.gguf_tokenizer import build_tokenizer  # noqa: PLC0415

    if is_gguf_path(model_dir):
        return build_tokenizer(GgufModel(model_dir))
    from transformers import AutoTokenizer  # noqa: PLC0415 (slow import)

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def calibration_ids(model_dir: str | Path) -> list[int]:
    """The calibration text in the model's own tokens."""
    return list(tokenizer_for(model_dir)(CALIBRATION_TEXT.read_text(encoding="utf-8"))["input_ids"])


def activation_absmax(hf_model: torch.nn.Module, input_ids: list[int]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of the inputs to each layer's QKV and gate/up projections and the head.

    Keys: "{layer}.qkv", "{layer}.gate_up", "lm_head" (q/k/v share an input, as do gate/up).
    """
    absmax: dict[str, torch.Tensor] = {}

    def record(key: str):  # noqa: ANN202
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            absmax[key] = x.abs().amax(dim=0)
        return hook

    modules = {"lm_head": hf_model.lm_head}
    for i, layer in enumerate(hf_model.model.layers):
        modules[f"{i}.qkv"] = layer.self_attn.q_proj
        modules[f"{i}.gate_up"] = layer.mlp.gate_proj
    handles = [m.register_forward_pre_hook(record(k)) for k, m in modules.items()]
    try:
        device = next(hf_model.parameters()).device
        with torch.no_grad():
            hf_model(torch.tensor([input_ids], device=device))
    finally:
        for h in handles:
            h.remove()
    return absmax
