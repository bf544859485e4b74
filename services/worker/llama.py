"""The worker's Llama-family forward pass over a flat, paged batch, with fused projections.

Weights come from a loaded Hugging Face model (safetensors or GGUF); its modules are then dropped.
Per layer this runs about a dozen torch ops: one RMSNorm, one fused QKV projection, rotary on
queries and keys together from a precomputed table, the KV write, attention, the output
projection, one RMSNorm, one fused gate/up projection, SiLU * up, down. Hugging Face's modules
spend about three times as many Python-level ops on the same layer, and at one decode token that
overhead, not arithmetic, is what a CPU step costs.

Float32 stays token-identical to `generate`: the fused GEMMs, `F.rms_norm` and the rotary table
give bitwise the same values as HF's separate projections, its RMSNorm formula and its rotary
module (checked on these shapes; tests compare logits and greedy tokens). Llama, Mistral and
Qwen2 (q/k/v bias) share this layout; Qwen3-style q/k norms are applied when present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.kernels import AttentionBackend, AttentionMetadata
from services.worker.linear import Linear, make_linear, smoothing_scales
from services.worker.parallel import ShardSpec, all_reduce


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def _cat_bias(*linears: torch.nn.Linear) -> torch.Tensor | None:
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
                      for b, m in zip(biases, linears)])


def _smooth(norm: torch.Tensor, weight: torch.Tensor, act_absmax: torch.Tensor | None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm and projection weights with SmoothQuant's factors folded in (unchanged without ranges)."""
    if act_absmax is None:
        return norm, weight
    s = smoothing_scales(act_absmax.to(weight.device), weight)
    return (norm.float() / s).to(norm.dtype), weight.float() * s


class LlamaModel:
    """Fused weights and the forward pass; `quantization` is "none" or "int8" (see linear.py).

    int8 covers the QKV, output and gate/up projections and the head, with SmoothQuant factors
    from `act_absmax` (calibration.py) folded into the RMSNorm before each. The down projection
    stays in the model dtype: its input, SiLU(gate) * up, has outliers no per-tensor activation
    scale survives; int8 there alone raised SmolLM2-135M's perplexity 20%, the other four together
    2.3%, and it is a third of the MLP's weights.
    """

    def __init__(self, hf_model: torch.nn.Module, *, max_model_len: int, quantization: str = "none",
                 act_absmax: dict[str, torch.Tensor] | None = None, shard: ShardSpec | None = None,
                 layer_range: range | None = None) -> None:
        """`layer_range`: the decoder layers this pipeline stage holds (all by default)."""
        inner = hf_model.model
        config = hf_model.config
        attn0 = inner.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.shard = shard  # tensor parallel: this rank's heads and MLP columns (parallel.py)
        self.num_heads = int(config.num_attention_heads) if shard is None else shard.num_heads
        self.num_kv_heads = int(config.num_key_value_heads) if shard is None else shard.num_kv_heads
        self.hidden_size = int(config.hidden_size)
        self.scale = float(attn0.scaling)
        self.eps = float(config.rms_norm_eps)
        self.quantization = quantization
        ranges = (act_absmax or {}) if quantization != "none" else {}
        self.embed = inner.embed_tokens.weight.detach()
        # The embedding stays in the model dtype (a lookup); the head is a projection like any other.
        with torch.no_grad():
            self.norm, head_w = _smooth(inner.norm.weight.detach(), hf_model.lm_head.weight.detach(),
                                        ranges.get("lm_head"))
        self.lm_head = make_linear(head_w, None, quantization)
        self.layers = []
        self.layer_range = layer_range if layer_range is not None else range(len(inner.layers))
        for i, layer in enumerate(inner.layers):
            if i not in self.layer_range:
                continue  # another pipeline stage's
            a, m = layer.self_attn, layer.mlp
            with torch.no_grad():
                # Smoothing scales are per input channel, so they are computed on the full weights
                # (every rank the same) before each rank keeps its rows.
                input_norm, qkv_w = _smooth(
                    layer.input_layernorm.weight.detach(),
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), ranges.get(f"{i}.qkv"))
                post_norm, gate_up_w = _smooth(
                    layer.post_attention_layernorm.weight.detach(),
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]), ranges.get(f"{i}.gate_up"))
                qkv_b = _cat_bias(a.q_proj, a.k_proj, a.v_proj)
                o_w, o_b, down_w = a.o_proj.weight.detach(), a.o_proj.bias, m.down_proj.weight.detach()
                if shard is not None:
                    qkv_w, qkv_b, gate_up_w, o_w, down_w = self._shard(shard, config, qkv_w, qkv_b, gate_up_w,
                                                                       o_w, down_w)
                    o_b = o_b if shard.tp_rank == 0 else None  # summed by the all-reduce: added once
                self.layers.append(LayerWeights(
                    input_norm=input_norm,
                    qkv=make_linear(qkv_w, qkv_b, quantization),
                    o=make_linear(o_w, o_b, quantization),
                    post_norm=post_norm,
                    gate_up=make_linear(gate_up_w, None, quantization),
                    down=make_linear(down_w, None, "none"),
                    q_norm=a.q_norm.weight.detach() if hasattr(a, "q_norm") else None,
                    k_norm=a.k_norm.weight.detach() if hasattr(a, "k_norm") else None,
                ))
        # HF's rotary module, evaluated once for every position: the same cos/sin it would compute
        # per step (rope scaling included), now one index per step.
        with torch.no_grad():
            probe = torch.zeros(1, dtype=self.embed.dtype, device=self.embed.device)
            positions = torch.arange(max_model_len, device=self.embed.device)[None]
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_model_len, head_dim]
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    def _shard(self, shard: ShardSpec, config, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,  # noqa: ANN001
               gate_up_w: torch.Tensor, o_w: torch.Tensor, down_w: torch.Tensor) -> tuple:
        """This rank's rows of the QKV and gate/up projections and columns of the output and down
        projections (weights are [out, in])."""
        hd = self.head_dim
        q_size, kv_size = int(config.num_attention_heads) * hd, int(config.num_key_value_heads) * hd
        q_rows = slice(shard.head_start * hd, (shard.head_start + shard.num_heads) * hd)
        kv_rows = slice(shard.kv_head_start * hd, (shard.kv_head_start + shard.num_kv_heads) * hd)

        def qkv_part(t: torch.Tensor) -> torch.Tensor:
            q, k, v = t[:q_size], t[q_size:q_size + kv_size], t[q_size + kv_size:]
            return torch.cat([q[q_rows], k[kv_rows], v[kv_rows]]).contiguous()

        inter = gate_up_w.shape[0] // 2
        cols = slice(shard.intermediate_start, shard.intermediate_start + shard.intermediate_size)
        gate_up = torch.cat([gate_up_w[:inter][cols], gate_up_w[inter:][cols]]).contiguous()
        return (qkv_part(qkv_w), None if qkv_b is None else qkv_part(qkv_b), gate_up,
                o_w[:, q_rows].contiguous(), down_w[:, cols].contiguous())

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # HF normalizes in float32 and casts back before the weight; keep that for half types.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def _rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                logits_indices: torch.Tensor, kv_layers: list[torch.Tensor],
                backend: AttentionBackend) -> torch.Tensor:
        """Float32 logits of the rows in `logits_indices` of the flat batch."""
        hidden = self.run_layers(self.embed_tokens(input_ids), positions, meta, kv_layers, backend)
        return self.logits(hidden, logits_indices)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed)

    def logits(self, hidden: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        # RMSNorm is per row, so normalizing only the rows that are sampled changes nothing.
        return self.lm_head(self._rms_norm(hidden[logits_indices], self.norm)).float()

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   kv_layers: list[torch.Tensor], backend: AttentionBackend) -> torch.Tensor:
        """This stage's decoder layers over the flat batch's hidden states."""
        num_tokens = hidden.shape[0]
        num_qk_heads = self.num_heads + self.num_kv_heads
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        for layer, kv_cache in zip(self.layers, kv_layers):
            x = self._rms_norm(hidden, layer.input_norm)
            qkv = layer.qkv(x)
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, num_qk_heads, self.head_dim)
            v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q = self._rms_norm(qk[:, : self.num_heads], layer.q_norm)
                k = self._rms_norm(qk[:, self.num_heads:], layer.k_norm)
                qk = torch.cat((q, k), dim=1)
            qk = self._rotary(qk, cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
            backend.write_kv(k, v, kv_cache, meta.slot_mapping)
            out = backend.attention(q, kv_cache, meta, self.scale)
            attn = layer.o(out.reshape(num_tokens, self.q_size))
            hidden = hidden + (attn if self.shard is None else all_reduce(attn))
            gate_up = layer.gate_up(self._rms_norm(hidden, layer.post_norm))
            gate, up = gate_up.chunk(2, dim=-1)
            mlp = layer.down(F.silu(gate) * up)
            hidden = hidden + (mlp if self.shard is None else all_reduce(mlp))
        return hidden
