"""Other Llama-family layouts (Qwen2 with q/k/v biases, Mistral) load and match HF the same way."""

from __future__ import annotations

import pytest
import torch

from services.worker.model_runner import ModelRunner
from tests.reference import assert_greedy_matches, hf_greedy
from tests.worker.harness import Job
from tests.worker.test_executor import make_prompts, run_jobs

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def save_random_model(kind: str, out_dir) -> None:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SHAPE, tie_word_embeddings=False))
    with torch.no_grad():  # the default 0.02 init gives near-uniform logits, i.e. argmax ties
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, param.shape[1] ** -0.5)
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(out_dir)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_family_matches_hf(kind: str, tmp_path) -> None:
    save_random_model(kind, tmp_path)
    runner = ModelRunner(tmp_path, num_blocks=64, block_size=16)
    assert runner.spec.model_type == kind
    prompts = make_prompts(SHAPE["vocab_size"], [1, 20, 70], seed=2)
    done, _ = run_jobs(runner, [Job(f"f{i}", p, 12, arrival_step=i) for i, p in enumerate(prompts)], token_budget=24)
    for i, prompt in enumerate(prompts):
        assert_greedy_matches(hf_greedy(tmp_path, prompt, 12), done[f"f{i}"].output_token_ids, kind)


def test_unsupported_architecture_is_named(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="gpt2"):
        ModelRunner(tmp_path, num_blocks=4)
