"""Pipeline parallelism: one step's flat batch through the stages as micro-batches.

The decoder layers are split into `pipeline_parallel_size` equal stages, each on its own ranks
(parallel.Layout; a stage may itself be tensor parallel). Every rank receives the whole step from
rank 0 (parallel.send_forward), cuts it into the same micro-batches (whole requests, about equal
tokens), and for each: the first stage embeds, every stage runs its layers (attention on its own
layers' KV), hands the hidden states to the next stage, and the last stage computes the sampled
rows' logits and sends them to rank 0. Sends do not wait for the receiver's compute, so while
stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1: the stages overlap. Rank 0 (stage
0) collects the logits of every micro-batch after its own share of the work, in order.
"""

from __future__ import annotations

import torch

from services.worker.kernels import AttentionBackend, AttentionMetadata, build_metadata
from services.worker.parallel import Layout, isend, recv, wait_all


def micro_batches(query_lens: tuple[int, ...], num_micro_batches: int) -> list[tuple[int, int]]:
    """(first request, end request) of each micro-batch: whole requests, cut where the cumulative
    token count crosses each equal share; never an empty one."""
    total = sum(query_lens)
    bounds, start, seen = [], 0, 0
    for i, n in enumerate(query_lens):
        seen += n
        if len(bounds) < num_micro_batches - 1 and seen * num_micro_batches >= total * (len(bounds) + 1):
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(query_lens):
        bounds.append((start, len(query_lens)))
    return bounds


def forward(model, layout: Layout, input_ids: torch.Tensor, positions: torch.Tensor,  # noqa: ANN001 - LlamaModel
            meta: AttentionMetadata, logits_indices: torch.Tensor, kv_layers: list[torch.Tensor],
            backend: AttentionBackend, block_size: int) -> torch.Tensor | None:
    """This rank's part of one step; rank 0 gets the float32 logits of `logits_indices`, in order."""
    device = input_ids.device
    tables = meta.block_tables.tolist()
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    rows = logits_indices.tolist()
    pieces: list[tuple[int, int]] = []  # (micro-batch's first token, number of logits rows) for rank 0
    # Sends never wait for the receiver: the last stage's logits for micro-batch 0 must not block it
    # from receiving micro-batch 1 while rank 0 is still computing micro-batch 1's first stage.
    pending = []
    for first, end in micro_batches(meta.query_lens, layout.pipeline_parallel_size):
        t0, t1 = starts[first], starts[end]
        mb_meta = build_metadata(meta.query_lens[first:end], meta.seq_lens_host[first:end], tables[first:end],
                                 block_size, device)
        mb_rows = [r - t0 for r in rows if t0 <= r < t1]
        pieces.append((t0, len(mb_rows)))
        if layout.is_first_stage:
            hidden = model.embed_tokens(input_ids[t0:t1])
        else:
            hidden = recv((t1 - t0, model.hidden_size), model.embed.dtype, layout.previous_rank).to(device)
        hidden = model.run_layers(hidden, positions[t0:t1], mb_meta, kv_layers, backend)
        if not layout.is_last_stage:
            pending.append(isend(hidden.cpu(), layout.next_rank))
        elif layout.tp_rank == 0 and mb_rows:
            logits = model.logits(hidden, torch.tensor(mb_rows, dtype=torch.int64, device=device))
            pending.append(isend(logits.cpu(), 0))
    if layout.rank != 0:
        wait_all(pending)
        return None
    vocab_size = model.embed.shape[0]
    gathered = [recv((n, vocab_size), torch.float32, layout.last_stage_rank).to(device) for _, n in pieces if n]
    wait_all(pending)
    return torch.cat(gathered) if gathered else torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
