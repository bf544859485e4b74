"""`python -m bench.kernels [--model DIR] [--out FILE]`: attention kernels on a CUDA GPU.

1. Copy bandwidth: a torch copy of a 1 GiB tensor, (read + write bytes) / time. Decode attention
   is bound by reading K/V, so this is its roof on this device.
2. Decode attention alone at batch 64 x 4k context (32 query heads, 8 KV heads, head_dim 128,
   bf16, block 16): the Triton split-K kernel, the torch backend (gather + masked SDPA), and PyTorch
   SDPA on K/V already gathered into contiguous tensors (no paging, no mask: the dense ideal).
   Each as K/V bytes read per second and as a fraction of the copy bandwidth.
3. Worker decode throughput on one model: `ModelRunner.forward` decode steps (the worker's own
   per-step metadata building included, sampling not) at a fixed batch and context, with
   attention_backend triton (CUDA graphs on, then off), torch, and "sdpa-gathered" (per step,
   gather each request's blocks into contiguous K/V, then SDPA without a mask).

Without CUDA it measures nothing and exits with status 1. Results go to stdout and to --out
(JSON). Benchmarks are not tests: it reports numbers, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="decode batch of the kernel measurement")
    p.add_argument("--context", type=int, default=4096, help="context tokens per request, kernel measurement")
    p.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "small-llama",
                   help="model of the worker measurement; the small preset is made there if missing")
    p.add_argument("--worker-batch", type=int, default=64)
    p.add_argument("--worker-context", type=int, default=1024,
                   help="context at the first timed step (capped to fit the model's max length)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per worker variant")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "tmp" / "kernels.json")
    return p.parse_args(argv)


def bench_ms(fn) -> float:  # noqa: ANN001
    import triton.testing  # noqa: PLC0415

    # Median of many runs, L2 flushed between them, so a 1 GB working set is read from HBM.
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device torch copy (each byte counted read and written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms / 1e3)


def decode_kernels(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, roof: float) -> list[dict]:
    from services.worker.kernels import build_metadata  # noqa: PLC0415
    from services.worker.kernels.torch_backend import TorchAttentionBackend  # noqa: PLC0415
    from services.worker.kernels.triton import TritonAttentionBackend  # noqa: PLC0415

    num_heads, num_kv_heads, head_dim, block_size = 32, 8, 128, 16
    batch, context = args.batch, args.context
    blocks_per_req = -(-context // block_size)
    num_blocks = 1 + batch * blocks_per_req
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    order = (torch.randperm(num_blocks - 1) + 1).reshape(batch, blocks_per_req).tolist()  # scattered blocks
    meta = build_metadata([1] * batch, [context] * batch, order, block_size, device)
    query = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * kv_cache.element_size()

    triton_backend = TritonAttentionBackend(device)
    torch_backend = TorchAttentionBackend()
    tables = meta.block_tables
    keys = kv_cache[0][tables].reshape(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2).contiguous()
    values = kv_cache[1][tables].reshape(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2).contiguous()
    q4 = query.view(batch, num_heads, 1, head_dim)
    variants = {
        "triton (paged, split-K)": lambda: triton_backend.attention(query, kv_cache, meta, scale),
        "torch backend (gather + masked SDPA)": lambda: torch_backend.attention(query, kv_cache, meta, scale),
        "SDPA on pre-gathered K/V (dense)": lambda: F.scaled_dot_product_attention(
            q4, keys, values, scale=scale, enable_gqa=True),
    }
    rows = []
    for name, fn in variants.items():
        ms = bench_ms(fn)
        rows.append({"variant": name, "ms": ms, "kv_gb_per_s": kv_bytes / (ms / 1e3) / 1e9,
                     "fraction_of_copy_bw": kv_bytes / (ms / 1e3) / roof})
    return rows


class GatheredSDPABackend:
    """Bench-only: a pure decode batch of equal contexts gathers each request's blocks into
    contiguous K/V and runs SDPA without a mask; anything else goes to the torch backend."""

    name = "sdpa-gathered"

    def __init__(self) -> None:
        from services.worker.kernels.torch_backend import TorchAttentionBackend  # noqa: PLC0415

        self._torch = TorchAttentionBackend()

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:  # noqa: ANN001
        self._torch.write_kv(key, value, kv_cache, slot_mapping)

    def attention(self, query, kv_cache, meta, scale):  # noqa: ANN001, ANN201
        lens = set(meta.seq_lens_host)
        if not meta.is_pure_decode or len(lens) != 1:
            return self._torch.attention(query, kv_cache, meta, scale)
        context = lens.pop()
        block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
        tables = meta.block_tables[:, : -(-context // block_size)]
        batch, num_heads = query.shape[0], query.shape[1]
        k = kv_cache[0][tables].reshape(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2)
        v = kv_cache[1][tables].reshape(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2)
        out = F.scaled_dot_product_attention(query.view(batch, num_heads, 1, head_dim), k, v, scale=scale,
                                             enable_gqa=True)
        return out.reshape(batch, num_heads, head_dim)


def worker_decode(args: argparse.Namespace, device: torch.device) -> tuple[dict, list[dict]]:
    from services.worker.kernels import build_metadata  # noqa: PLC0415
    from services.worker.make_model import make_model  # noqa: PLC0415
    from services.worker.model_runner import ModelRunner  # noqa: PLC0415

    model_dir = args.model
    if not (model_dir / "config.json").exists():
        print(f"making the small model in {model_dir} ...", flush=True)
        make_model("small", model_dir)
    batch, block_size, warmup = args.worker_batch, 16, 8
    max_len = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    context = min(args.worker_context, max_len - warmup - args.steps - 1)
    blocks_per_req = -(-(context + warmup + args.steps + 1) // block_size)
    variants = [("triton + CUDA graphs", "triton", True), ("triton, eager", "triton", False),
                ("torch backend", "torch", False), ("SDPA on gathered K/V", "sdpa-gathered", False)]
    setup: dict = {}
    rows = []
    for name, backend, graphs in variants:
        runner = ModelRunner(model_dir, dtype=args.dtype, device=str(device), block_size=block_size,
                             num_blocks=1 + batch * blocks_per_req, cuda_graphs=graphs,
                             attention_backend="torch" if backend == "sdpa-gathered" else backend)
        if backend == "sdpa-gathered":
            runner.backend = GatheredSDPABackend()
        setup = {"model": str(model_dir), "dtype": args.dtype, "batch": batch, "context": context,
                 "steps": args.steps, "num_layers": runner.spec.num_layers, "num_kv_heads": runner.spec.num_kv_heads,
                 "head_dim": runner.spec.head_dim}
        tables = [list(range(1 + i * blocks_per_req, 1 + (i + 1) * blocks_per_req)) for i in range(batch)]
        gen = torch.Generator().manual_seed(0)
        rows_idx = torch.arange(batch, device=device)

        def step(seq_len: int) -> None:
            # What the executor does per step: host lists to device tensors, then the forward.
            meta = build_metadata([1] * batch, [seq_len] * batch, tables, block_size, device)
            ids = torch.randint(3, runner.spec.vocab_size, (batch,), generator=gen).to(device)
            positions = torch.full((batch,), seq_len - 1, dtype=torch.int64, device=device)
            runner.forward(ids, positions, meta, rows_idx)

        for s in range(warmup):
            step(context + s + 1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for s in range(args.steps):
            step(context + warmup + s + 1)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        rows.append({"variant": name, "step_ms": 1e3 * elapsed / args.steps,
                     "tokens_per_s": batch * args.steps / elapsed})
        del runner
        torch.cuda.empty_cache()
    return setup, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels: no CUDA device here (torch.cuda.is_available() is False); it measures GPU "
              "kernels only, so nothing was measured", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench.kernels: TRITON_INTERPRET=1 would time the CPU interpreter; unset it", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    gpu = torch.cuda.get_device_name(device)
    roof = copy_bandwidth(device)
    print(f"{gpu}: copy bandwidth {roof / 1e9:.0f} GB/s (torch copy of 1 GiB, read + write)\n")

    kernel_rows = decode_kernels(args, dtype, device, roof)
    print(f"decode attention, batch {args.batch} x {args.context} context, 32 q / 8 KV heads, head_dim 128, "
          f"{args.dtype}, block 16")
    print(f"{'variant':40} {'ms':>8} {'K/V GB/s':>9} {'of copy BW':>10}")
    for r in kernel_rows:
        print(f"{r['variant']:40} {r['ms']:8.3f} {r['kv_gb_per_s']:9.0f} {r['fraction_of_copy_bw']:10.1%}")

    setup, worker_rows = worker_decode(args, device)
    print(f"\nworker decode, {setup['model']} ({setup['num_layers']} layers, {setup['num_kv_heads']} KV heads, "
          f"head_dim {setup['head_dim']}, {args.dtype}), batch {setup['batch']} at context {setup['context']}, "
          f"{setup['steps']} steps")
    print(f"{'variant':40} {'ms/step':>8} {'tokens/s':>10}")
    for r in worker_rows:
        print(f"{r['variant']:40} {r['step_ms']:8.2f} {r['tokens_per_s']:10.0f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": gpu, "torch": torch.__version__, "copy_bandwidth_gb_per_s": roof / 1e9,
        "decode_attention": {"batch": args.batch, "context": args.context, "dtype": args.dtype,
                             "variants": kernel_rows},
        "worker_decode": {**setup, "variants": worker_rows},
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
