"""Perplexity of a text under the worker's own forward pass: the quality gate for bf16 and int8.

`python -m services.worker.perplexity --text FILE [--model DIR] [--dtype D] [--quantization Q]`
prints the perplexity; run it once with float32 and once with the precision you mean to serve and
compare. It goes through `ModelRunner` (fused weights, paged KV, the attention backend), so it
measures exactly what the worker serves. The text is scored as one sequence in prefill chunks.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from services.worker.calibration import tokenizer_for
from services.worker.kernels.interface import build_metadata
from services.worker.model_runner import ModelRunner


def perplexity(runner: ModelRunner, input_ids: list[int], chunk_tokens: int = 256) -> float:
    """exp(mean negative log-likelihood of token i+1 given tokens 0..i), over the whole sequence."""
    if len(input_ids) < 2:
        raise ValueError(f"input_ids: need at least 2 tokens, got {len(input_ids)}")
    if len(input_ids) > runner.spec.max_model_len:
        raise ValueError(f"input_ids: {len(input_ids)} tokens exceed max_model_len {runner.spec.max_model_len}")
    block_size = runner.block_size
    num_blocks = -(-len(input_ids) // block_size)
    if num_blocks > runner.num_blocks - 1:
        raise ValueError(f"input_ids: {len(input_ids)} tokens need {num_blocks} KV blocks, the pool has "
                         f"{runner.num_blocks - 1}")
    table = list(range(1, num_blocks + 1))  # block 0 is the null block
    nll, count = 0.0, 0
    for start in range(0, len(input_ids) - 1, chunk_tokens):
        ids = input_ids[start:start + chunk_tokens]
        meta = build_metadata([len(ids)], [start + len(ids)], [table], block_size, runner.device)
        logits = runner.forward(
            torch.tensor(ids, device=runner.device), torch.arange(start, start + len(ids), device=runner.device),
            meta, torch.arange(len(ids), device=runner.device))
        targets = torch.tensor(input_ids[start + 1:start + 1 + len(ids)], device=runner.device)
        log_probs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        nll -= float(log_probs.gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.worker.perplexity", description=__doc__.splitlines()[0])
    p.add_argument("--text", required=True, help="a UTF-8 text file to score")
    p.add_argument("--model", default="models/smollm2-135m-instruct", help="model directory or .gguf file")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="none", choices=["none", "int8"])
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        text = Path(a.text).read_text(encoding="utf-8")
        ids = list(tokenizer_for(a.model)(text)["input_ids"])
        runner = ModelRunner(a.model, dtype=a.dtype, device=a.device, quantization=a.quantization,
                             max_model_len=None, num_blocks=-(-len(ids) // 16) + 1)
        value = perplexity(runner, ids)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.model} {runner.spec.dtype} quantization={a.quantization}: perplexity {value:.3f} "
          f"over {len(ids)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
