"""Hugging Face references that our outputs are compared against.

Greedy parity follows DESIGN.md: tokens must match `generate` exactly, except that where the
reference's top two log-probabilities are within 1e-3 either choice is acceptable, so the
comparison stops there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

TIE_MARGIN = 1e-3


@dataclass(frozen=True)
class Reference:
    token_ids: list[int]
    top2_gaps: list[float]  # log-prob gap between the best and second-best token at each step

    def comparable_prefix(self) -> int:
        """How many leading tokens must match exactly (up to and excluding the first near-tie)."""
        for i, gap in enumerate(self.top2_gaps):
            if gap < TIE_MARGIN:
                return i
        return len(self.token_ids)


@lru_cache(maxsize=4)
def load_hf_model(model_dir: str):  # noqa: ANN201 (transformers type)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()


@torch.inference_mode()
def hf_greedy(model_dir: str | Path, prompt_token_ids: Sequence[int], max_new_tokens: int,
              eos_token_ids: Sequence[int] | None = None) -> Reference:
    """HF `generate` with greedy decoding; EOS stops it only when `eos_token_ids` are given (the
    returned tokens then end with the EOS that stopped it, as HF's do)."""
    model = load_hf_model(str(model_dir))
    out = model.generate(
        torch.tensor([list(prompt_token_ids)]),
        attention_mask=torch.ones(1, len(prompt_token_ids), dtype=torch.int64),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(eos_token_ids) if eos_token_ids else None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_token_ids):].tolist()
    gaps = []
    for step_logits in out.logits:
        top2 = torch.log_softmax(step_logits[0].float(), dim=-1).topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return Reference(tokens, gaps)


@torch.inference_mode()
def hf_logprobs(model_dir: str | Path, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]) -> torch.Tensor:
    """log_softmax of HF logits at each generated position: [len(output), vocab]."""
    model = load_hf_model(str(model_dir))
    ids = torch.tensor([list(prompt_token_ids) + list(output_token_ids)])
    logits = model(ids).logits[0].float()
    n = len(prompt_token_ids)
    return torch.log_softmax(logits[n - 1 : n - 1 + len(output_token_ids)], dim=-1)


def assert_greedy_matches(reference: Reference, actual: Sequence[int], label: str = "") -> int:
    """Asserts `actual` equals the reference up to its first near-tie; returns tokens compared."""
    n = reference.comparable_prefix()
    assert list(actual[:n]) == reference.token_ids[:n], (
        f"{label}: greedy tokens differ from HF generate within the first {n} (tie-free) tokens:\n"
        f"  ours {list(actual[:n])}\n  hf   {reference.token_ids[:n]}"
    )
    return n
