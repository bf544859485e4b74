"""The runners our stack is compared with, each `(model_dir, workload, ...) -> (records, duration_s)`:

- `run_in_process` (bench/engine.py): our own scheduler core + worker core in one thread, no gRPC,
  no processes; with `null_model=True` the pipeline alone. What the services cost is the stack
  measured against this.
- `run_hf_static` (bench/hf_peers.py): Hugging Face `generate` on static batches.
- `run_hf_continuous` (bench/hf_peers.py): transformers' own continuous batching manager.
"""

from bench.engine import Admission, plan_to_step, result_to_outputs, run_in_process
from bench.hf_peers import run_hf_continuous, run_hf_static

__all__ = ["Admission", "plan_to_step", "result_to_outputs", "run_hf_continuous", "run_hf_static", "run_in_process"]
