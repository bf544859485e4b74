"""Quality gates for the reduced precisions on the real default model (SmolLM2-135M-Instruct).

Perplexity on a fixed text (tests/worker/data/perplexity.txt, not the int8 calibration text)
through the worker's own forward pass: bfloat16 within 1% of float32, int8 within 3%; and int8
still answers the factual questions the float32 stack is held to.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.tokenizer.codec import Codec
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.perplexity import perplexity
from services.worker.sampler import SamplingParams
from tests.e2e.test_real_model import FACTS
from tests.worker.harness import Job, MiniScheduler

TEXT = Path(__file__).with_name("data") / "perplexity.txt"


@pytest.fixture(scope="module")
def text_ids(smollm2_model_dir) -> list[int]:
    return Codec(smollm2_model_dir).encode(TEXT.read_text(encoding="utf-8"))


def runner(model_dir: Path, num_tokens: int, **kwargs) -> ModelRunner:
    return ModelRunner(model_dir, num_blocks=-(-num_tokens // 16) + 8, block_size=16, **kwargs)


@pytest.fixture(scope="module")
def float32_perplexity(smollm2_model_dir, text_ids) -> float:
    value = perplexity(runner(smollm2_model_dir, len(text_ids), dtype="float32"), text_ids)
    assert 5 < value < 100, f"float32 perplexity {value:.2f}: the text or the model is not what this test expects"
    return value


@pytest.mark.parametrize(("kwargs", "tolerance"), [
    ({"dtype": "bfloat16"}, 0.01),
    ({"dtype": "float32", "quantization": "int8"}, 0.03),
])
def test_reduced_precision_perplexity_stays_close_to_float32(smollm2_model_dir, text_ids, float32_perplexity,
                                                             kwargs, tolerance) -> None:
    value = perplexity(runner(smollm2_model_dir, len(text_ids), **kwargs), text_ids)
    assert value / float32_perplexity - 1 <= tolerance, (
        f"{kwargs}: perplexity {value:.3f} vs float32 {float32_perplexity:.3f} "
        f"(+{100 * (value / float32_perplexity - 1):.2f}%, limit {100 * tolerance:.0f}%)")


def test_int8_still_answers_the_factual_questions(smollm2_model_dir) -> None:
    codec = Codec(smollm2_model_dir)
    model = runner(smollm2_model_dir, 2048, quantization="int8")
    greedy = SamplingParams(temperature=0.0)
    jobs = [Job(str(i), codec.encode(codec.render_chat([("user", q)])), 32, sampling=greedy)
            for i, q in enumerate(FACTS)]
    mini = MiniScheduler(block_size=model.block_size, num_blocks=model.num_blocks, token_budget=512)
    done = mini.run(Executor(model).execute, jobs)
    def reply(ids: list[int]) -> str:  # up to the end of turn, as the stack stops
        ends = [i for i, t in enumerate(ids) if t in model.spec.eos_token_ids]
        return codec.tokenizer.decode(ids[: ends[0]] if ends else ids)

    answers = {q: reply(done[str(i)].output_token_ids) for i, q in enumerate(FACTS)}
    wrong = {q: a for q, a in answers.items() if FACTS[q].lower() not in a.lower()}
    assert not wrong, f"int8 answers wrong: {wrong}"
