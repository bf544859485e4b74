"""The Triton kernels at real shapes on a GPU, and the CUDA-graph decode path against eager.

Real shapes: head_dim 128, 32 query heads, 8 KV heads, contexts up to 32k, bf16 and fp16, block
sizes 16 and 32, against the torch backend in float32 on the same rounded values. As in the CPU
tests, every slot outside a request's context holds NaN, so any stray read shows.

Run on a CUDA machine, in a process of its own (the CPU tests set TRITON_INTERPRET=1 only where
there is no CUDA, but a stray TRITON_INTERPRET in the environment would make these interpreted):
    .venv/bin/python -m pytest -q -m gpu tests/worker/test_triton_gpu.py
Nothing is imported from the kernels at module level: this module is collected on CPU-only CI,
where importing them here would decorate them before test_triton_kernels.py sets the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
TOLERANCES = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}  # see test_triton_kernels.py


@pytest.fixture(scope="module")
def triton_backend_cls():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 is set: these tests measure the compiled kernels; unset it")
    from services.worker.kernels.triton import INTERPRETED, TritonAttentionBackend  # noqa: PLC0415

    assert not INTERPRETED, "the kernels were imported in interpreter mode earlier in this process"
    return TritonAttentionBackend


def run_case(backend, shapes: list[tuple[int, int]], block_size: int, dtype: torch.dtype, seed: int = 0) -> None:
    """Builds one flat batch (vectorised: contexts are long), checks write_kv and attention."""
    from services.worker.kernels import build_metadata  # noqa: PLC0415
    from services.worker.kernels.torch_backend import TorchAttentionBackend  # noqa: PLC0415

    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for _, s in shapes]
    num_blocks = 1 + sum(blocks_per_req)
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables, start = [], 0
    for n in blocks_per_req:
        tables.append(order[start : start + n])
        start += n
    cache = torch.randn(2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    flat = cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    context = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    new_keys, new_values = [], []
    for (q_len, seq_len), table in zip(shapes, tables):
        pos = torch.arange(seq_len, device=device)
        slots = torch.tensor(table, device=device)[pos // block_size] * block_size + pos % block_size
        context[slots] = True
        kv = torch.randn(2, seq_len, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        flat[:, slots[: seq_len - q_len]] = kv[:, : seq_len - q_len]
        new_keys.append(kv[0, seq_len - q_len :])
        new_values.append(kv[1, seq_len - q_len :])
    new_key, new_value = torch.cat(new_keys), torch.cat(new_values)
    num_tokens = sum(q for q, _ in shapes)
    # x3: peakier softmax than unit-variance scores give, so single keys matter to the output.
    query = 3 * torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    meta = build_metadata([q for q, _ in shapes], [s for _, s in shapes], tables, block_size, device)
    scale = HEAD_DIM**-0.5

    reference = TorchAttentionBackend()
    ref_cache = cache.clone()
    reference.write_kv(new_key, new_value, ref_cache, meta.slot_mapping)
    expected = reference.attention(query.float(), ref_cache.float(), meta, scale)
    flat[:, ~context] = float("nan")
    backend.write_kv(new_key, new_value, cache, meta.slot_mapping)
    assert torch.equal(flat[:, context], ref_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)[:, context])
    out = backend.attention(query, cache, meta, scale)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_real_shapes(triton_backend_cls, dtype: torch.dtype, block_size: int) -> None:
    shapes = [(1, 1), (1, 17), (1, 4095), (1, 4096), (1, 32768),  # decodes, split-K chosen per batch
              (512, 32768), (2048, 2048), (100, 8292)]  # chunk after 32k context, fresh prefill, prefix hit
    run_case(triton_backend_cls("cuda"), shapes, block_size, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 32])
def test_split_k_decode_long_contexts(triton_backend_cls, num_splits: int) -> None:
    shapes = [(1, n) for n in (1, 255, 1000, 8191, 16384, 30000, 32768)]
    run_case(triton_backend_cls("cuda", num_splits=num_splits), shapes, 16, torch.bfloat16, seed=num_splits)


def test_decode_batch_64_by_4k(triton_backend_cls) -> None:
    run_case(triton_backend_cls("cuda"), [(1, 4096)] * 64, 16, torch.bfloat16, seed=64)


def test_cuda_graph_decode_matches_eager(tiny_model_dir) -> None:
    """The tiny model greedy through the executor: graphs on, graphs off, and the torch backend."""
    from services.worker.executor import Executor  # noqa: PLC0415
    from services.worker.model_runner import ModelRunner  # noqa: PLC0415
    from tests.worker.harness import Job, MiniScheduler  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    outputs = {}
    for label, backend, graphs in [("graphs", "triton", True), ("eager", "triton", False), ("torch", "torch", False)]:
        runner = ModelRunner(tiny_model_dir, device="cuda", num_blocks=256, block_size=16,
                             attention_backend=backend, cuda_graphs=graphs)
        assert (runner._decode_graphs is not None) == graphs
        gen.manual_seed(0)
        # 3 requests then 9 then 5 running: batch sizes that pad (3 -> 4, 9 -> 16, 5 -> 8).
        prompts = [torch.randint(3, runner.spec.vocab_size, (n,), generator=gen).tolist()
                   for n in (5, 40, 17, 3, 8, 70, 33, 12, 9)]
        jobs = [Job(f"r{i}", p, 12 if i < 5 else 24, arrival_step=0 if i < 3 else 4) for i, p in enumerate(prompts)]
        done = MiniScheduler(block_size=16, num_blocks=256, token_budget=64).run(Executor(runner).execute, jobs)
        outputs[label] = {rid: job.output_token_ids for rid, job in done.items()}
        del runner
        torch.cuda.empty_cache()
    assert outputs["graphs"] == outputs["eager"]
    assert outputs["eager"] == outputs["torch"]
