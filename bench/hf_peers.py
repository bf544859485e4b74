"""Hugging Face peers: what you get from transformers alone on the same model and workload.

- `run_hf_static`: `model.generate` on static batches (the classic way to serve with HF).
- `run_hf_continuous`: transformers' own continuous batching (`ContinuousBatchingManager`, 5.x).

Both load the model in float32 with `attn_implementation="sdpa"`, decode greedily with EOS
disabled (every request runs to its `max_tokens`, as in our runs with `ignore_eos`), warm up before
the clock starts, and admit requests with the same `Admission` rules as the in-process engine
(closed loop: at most `workload.concurrency` in flight; open loop: `arrival_s`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import ceil
from pathlib import Path

import torch

from bench.engine import Admission
from bench.records import RequestRecord
from bench.workload import Workload, WorkloadRequest

ATTN_IMPLEMENTATION = "sdpa"  # works on CPU for generate and for HF continuous batching


def _load(model_dir: str | Path, attn_implementation: str = ATTN_IMPLEMENTATION):  # noqa: ANN202 (transformers type)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 (slow import)

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True,
    ).eval()


class _ThreadCount:
    """`torch.set_num_threads(n)` for the duration of a run (None leaves torch's default)."""

    def __init__(self, num_threads: int | None) -> None:
        self._n = num_threads
        self._previous = torch.get_num_threads()

    def __enter__(self) -> None:
        if self._n:
            torch.set_num_threads(self._n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._previous)


# --- static batching with generate ------------------------------------------------------------


def _step_clock():  # noqa: ANN202 (a transformers StoppingCriteria)
    from transformers import StoppingCriteria  # noqa: PLC0415

    class StepClock(StoppingCriteria):
        """Never stops generation; records `time.perf_counter()` once per generation step.

        `generate` calls stopping criteria right after each step's tokens are chosen and appended,
        so `times[i]` is when token i of every sequence in the batch existed."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepClock()


@torch.inference_mode()
def _generate_static(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int
                     ) -> tuple[list[list[int]], list[float]]:  # noqa: ANN001
    """One left-padded batch; returns each row's generated ids and the time of each step."""
    from transformers import StoppingCriteriaList  # noqa: PLC0415

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
        attention_mask[i, width - len(prompt):] = 1
    clock = _step_clock()
    # Generation arguments as keywords, not a GenerationConfig: a config's eos_token_id=None is
    # filled in from the model's generation_config (and min_new_tokens then masks EOS out of the
    # logits, changing greedy tokens); the keyword None really disables EOS, as tests/reference.py does.
    out = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=pad_token_id,
                         stopping_criteria=StoppingCriteriaList([clock]))
    return out[:, width:].tolist(), clock.times


def run_hf_static(model_dir: str | Path, workload: Workload, batch_size: int, *,
                  num_threads: int | None = None) -> tuple[list[RequestRecord], float]:
    """Hugging Face `generate` over static batches of `batch_size`, in workload order.

    Each batch is left-padded (with attention masks) and generates the batch's largest
    `max_tokens` for every row (`min_new_tokens = max_new_tokens`, EOS disabled), so the batch runs
    to its longest member; a request counts only its own `max_tokens` as output. The tokens beyond
    that are the static-batching waste: they cost time and count for nothing.

    Timing: token i of every request in a batch gets the time of generation step i (a
    StoppingCriteria records it as soon as the step's tokens exist), as if it were streamed; `end_s`
    is when `generate` returned the whole batch, which is when a non-streaming server could answer.
    A batch starts once its requests have been sent (`Admission`): in a closed loop with
    `concurrency` below `batch_size` it runs with the requests in flight; in an open loop it waits
    for its last member's arrival, the classic static server's behaviour.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with _ThreadCount(num_threads):
        model = _load(model_dir)
        pad = model.config.pad_token_id
        pad = 0 if pad is None else int(pad if not isinstance(pad, list) else pad[0])
        if workload.requests:  # warm-up batch outside the clock
            first = workload.requests[0].prompt_token_ids
            _generate_static(model, [first] * min(batch_size, len(workload.requests)), 2, pad)
        records: dict[str, RequestRecord] = {}
        t0 = time.perf_counter()
        admission = Admission(workload, t0)
        queue: list[tuple[WorkloadRequest, float]] = []
        last_s = t0
        while not admission.exhausted or queue:
            queue.extend(admission.due(time.perf_counter()))
            more_coming = admission.next_arrival_s() is not None
            if len(queue) < batch_size and more_coming:
                time.sleep(max(0.0, admission.next_arrival_s() - time.perf_counter()))
                continue
            batch, queue = queue[:batch_size], queue[batch_size:]
            max_new = max(wr.max_tokens for wr, _ in batch)
            outputs, step_times = _generate_static(model, [wr.prompt_token_ids for wr, _ in batch], max_new, pad)
            end_s = time.perf_counter()
            for (wr, start_s), tokens in zip(batch, outputs):
                records[wr.request_id] = RequestRecord(
                    wr.request_id, len(wr.prompt_token_ids), start_s,
                    token_times_s=list(step_times[: wr.max_tokens]), end_s=end_s,
                    output_token_ids=list(tokens[: wr.max_tokens]))
                admission.release(end_s)
            last_s = end_s
        return [records[r.request_id] for r in workload.requests], last_s - t0


# --- Hugging Face continuous batching ----------------------------------------------------------


def _kv_bytes_per_token(config) -> int:  # noqa: ANN001 (PretrainedConfig)
    text = config.get_text_config()
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    return 2 * text.num_hidden_layers * num_kv_heads * head_dim * 4  # K and V, float32


def cb_num_blocks(workload: Workload, page_size: int, max_requests_per_batch: int) -> int:
    """HF cache blocks (of `page_size` tokens, all layers) for every request that can be in flight
    at once to hold its whole sequence, plus one spare per request: no preemption from lack of KV."""
    if not workload.requests:
        return 1
    longest = max(len(r.prompt_token_ids) + r.max_tokens for r in workload.requests)
    in_flight = min(len(workload.requests), workload.concurrency or len(workload.requests), max_requests_per_batch)
    return in_flight * (ceil(longest / page_size) + 1)


def run_hf_continuous(
    model_dir: str | Path,
    workload: Workload,
    *,
    num_threads: int | None = None,
    max_batch_tokens: int = 2048,
    max_requests_per_batch: int = 128,
    page_size: int = 256,
    num_blocks: int | None = None,
    attn_implementation: str = ATTN_IMPLEMENTATION,
    timeout_s: float = 600.0,
) -> tuple[list[RequestRecord], float]:
    """transformers' own continuous batching (`model.init_continuous_batching()` → a
    `ContinuousBatchingManager` with a background generation thread and a paged KV cache).

    Used the way its documentation intends for serving: `manager.start()`, then
    `add_request(input_ids, request_id, max_new_tokens=..., record_timestamps=True,
    eos_token_id=-1)` per request as the workload admits it, and `get_result()` for finished
    requests. `max_new_tokens` is per request, so each request generates exactly its own
    `max_tokens` (no wasted tokens to discount), and `eos_token_id=-1` disables EOS.

    Measured: `start_s` is when we called `add_request`; `token_times_s` are the manager's own
    per-token timestamps (`record_timestamps=True`: `time.perf_counter()` in the generation
    thread when each token is appended, the same clock as ours), so TTFT, ITL and TPOT are real;
    `end_s` is when the finished result reached us.

    On CPU: `attn_implementation="sdpa"` (the manager keeps SDPA over its paged cache; "eager"
    becomes "paged|eager"; flash kernels need CUDA). No CUDA graphs or compile (the manager
    disables both off-GPU). The cache is sized explicitly, `num_blocks` by default from
    `cb_num_blocks` (the in-flight requests' whole sequences) and `max_batch_tokens` /
    `max_requests_per_batch` like our scheduler's defaults: left to itself on CPU the manager
    takes 60 % of host memory for KV (about 20 s just to allocate on a 24 GB machine). Prefix
    sharing (`allow_block_sharing`) stays at its default, on, like our prefix cache.

    Raises RuntimeError (with the reason) if the manager cannot start or dies on this machine.
    """
    from transformers import GenerationConfig  # noqa: PLC0415
    from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: PLC0415

    with _ThreadCount(num_threads):
        model = _load(model_dir, attn_implementation)
        longest_output = max((r.max_tokens for r in workload.requests), default=1)
        generation_config = GenerationConfig(do_sample=False, max_new_tokens=longest_output, eos_token_id=-1,
                                             pad_token_id=model.config.pad_token_id or 0)
        cb_config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=num_blocks or cb_num_blocks(workload, page_size, max_requests_per_batch),
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_requests_per_batch,
            use_cuda_graph=False,
        )
        try:
            manager = model.init_continuous_batching(generation_config=generation_config,
                                                     continuous_batching_config=cb_config)
            manager.warmup()  # builds the cache and batch processor (no graphs to capture on CPU)
            manager.start()
        except Exception as e:  # noqa: BLE001 - re-raised with the reason the report shows
            raise RuntimeError(f"transformers continuous batching cannot run here "
                               f"({attn_implementation}, {model.device}): {type(e).__name__}: {e}") from e
        try:
            if workload.requests:  # warm-up request outside the clock
                _cb_one(manager, "__warmup__", list(workload.requests[0].prompt_token_ids), 2, timeout_s)
            return _drive_cb(manager, workload, timeout_s)
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()


def _check_alive(manager) -> None:  # noqa: ANN001
    if not manager.is_running():
        error = manager.background_thread_status.fatal_error
        raise RuntimeError(f"transformers continuous batching stopped: {error!r}" if error
                           else "transformers continuous batching thread exited")


def _cb_one(manager, request_id: str, prompt: list[int], max_new_tokens: int, timeout_s: float) -> None:  # noqa: ANN001
    manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new_tokens, eos_token_id=-1)
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        result = manager.get_result(timeout=0.1)
        if result is not None and result.is_finished():
            if result.error:
                raise RuntimeError(f"transformers continuous batching failed a request: {result.error}")
            return
        if result is None:
            _check_alive(manager)
    raise RuntimeError(f"transformers continuous batching: no result in {timeout_s} s")


def _drive_cb(manager, workload: Workload, timeout_s: float) -> tuple[list[RequestRecord], float]:  # noqa: ANN001
    records: dict[str, RequestRecord] = {}
    t0 = time.perf_counter()
    admission = Admission(workload, t0)
    last_s = t0
    deadline = t0 + timeout_s
    while not admission.exhausted or admission.num_in_flight:
        for wr, start_s in admission.due(time.perf_counter()):
            records[wr.request_id] = RequestRecord(wr.request_id, len(wr.prompt_token_ids), start_s)
            manager.add_request(list(wr.prompt_token_ids), request_id=wr.request_id, max_new_tokens=wr.max_tokens,
                                record_timestamps=True, eos_token_id=-1)
        next_s = admission.next_arrival_s()
        wait_s = 0.5 if next_s is None else min(0.5, max(0.0, next_s - time.perf_counter()))
        result = manager.get_result(timeout=wait_s) if admission.num_in_flight else None
        if result is None:
            if admission.num_in_flight:
                _check_alive(manager)
            elif next_s is not None:
                time.sleep(max(0.0, next_s - time.perf_counter()))
            if time.perf_counter() > deadline:
                raise RuntimeError(f"transformers continuous batching: workload not done in {timeout_s} s")
            continue
        if not result.is_finished() or result.request_id not in records:
            continue
        now = time.perf_counter()
        record = records[result.request_id]
        record.output_token_ids = list(result.generated_tokens)
        record.token_times_s = list(result.timestamps or [])
        record.end_s = now
        if result.error:
            record.error = str(result.error)
        admission.release(now)
        last_s = max(last_s, record.token_times_s[-1] if record.token_times_s else now)
    return [records[r.request_id] for r in workload.requests], last_s - t0
