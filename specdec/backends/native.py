"""The native fast path: a Llama-family forward written for batch-1 steps on the static cache, ~10 kernels a layer.

Why (measured, issue 4): under CUDA graphs HF's Llama modules still launch ~36 kernels a layer (RMSNorm alone is
six, rotary ~ten, three q/k/v and two gate/up GEMVs, two cache index copies); at batch 1 each costs ~3 us of launch
and ramp, so a 1.1B step took 3.16 ms against a 0.73 ms weight-read floor. This forward runs, per layer:

    add+RMSNorm -> GEMV qkv -> rotary + KV write -> tree attention -> GEMV o -> add+RMSNorm -> GEMV gate_up
    -> silu*up -> GEMV down

(steps past ROWS_MAX_QUERIES queries; steps of 1..ROWS_MAX_QUERIES fold the norms, rotary + KV write, SwiGLU gate
and residual adds into the products instead: five launches a layer, `specdec.kernels.gemv` / `gemm_rows`),
with q/k/v and gate/up fused into one weight each (the HF modules' weights become views into the fused ones, so no
memory is doubled and the HF model keeps working), rotary tables precomputed for every position of the cache by the
model's own rotary module (its rope scaling included), and the four Triton kernels of `specdec.kernels`. Weights
come from the loaded HF model (so from its safetensors); the KV buffer is `StaticBackend`'s, so commits, kv_compact
and the drafters' `GraphKV` work unchanged.

`NativeBackend` is `GraphBackend` with this forward in every step (graphs, buckets and the one-copy inputs as
there); `native_backend(model)` falls back to `GraphBackend` with a warning where the model or the machine cannot
run it (not a Llama/Mistral/Qwen2-style model, no Triton or CUDA).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from specdec.backends.graph import DEFAULT_BUCKETS, GraphBackend, _Step
from specdec.backends.static import StaticState
from specdec.kernels.embedding import embedding
from specdec.kernels.gemm_rows import MAX_ROWS, rows_gated, rows_linear, rows_qkv_rope
from specdec.kernels.gemv import gemv, gemv_gated, gemv_qkv_rope
from specdec.kernels.rmsnorm import add_rmsnorm
from specdec.kernels.rope_cache import rope_cache
from specdec.kernels.silu_mul import silu_mul
from specdec.kernels.tree_attention import kernel_available, tree_attention

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# The most queries a step runs through the row GEMMs (gemm_rows: up to MAX_ROWS). Measured on the H100 (CUDA-graph
# GPU time of the verify step, context 2048, evals/scripts/gemm_rows_bench.py): 2..16 queries gain 3-16% over the
# unfused layer at the zoo, 1.1B and 7B shapes; 32 and 64 lose at 1.1B and 7B (every program re-reads and
# re-normalises all rows of x: 0.60x at 7B, T = 64). At the zoo shape 32 rows gained in GPU time (0.577 vs 0.602 ms)
# but lost in the step's wall time (`specdec bench-step --shapes zoo`: 0.76 ms at 32 vs 0.62 at 16), so 16 for all.
ROWS_MAX_QUERIES = 16
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # tables that do not change with the sequence length


@dataclass
class _Layer:
    input_norm: torch.Tensor    # (H,)
    qkv: torch.Tensor           # ((Hq + 2 Hkv) D, H): [q; k; v] rows
    qkv_bias: torch.Tensor | None
    out: torch.Tensor           # (H, Hq D)
    post_norm: torch.Tensor     # (H,)
    gate_up: torch.Tensor       # (2 I, H): [gate; up] rows
    down: torch.Tensor          # (H, I)


@dataclass(frozen=True)
class _FusedKernels:
    """The three launchers of a five-launch layer (norms, rotary, cache write, gate and residual adds fused in)."""
    linear: Callable       # (x, weight, norm, eps, bias, residual) -> x^ @ weight^T
    gated: Callable        # (x, gate_up, norm, eps) -> silu(gate) * up
    qkv_rope: Callable     # (x, qkv, positions, slots, cos, sin, keys, values, Hq, norm, eps, bias, queries)


@dataclass(frozen=True)
class BatchRows:
    """A batched cache's layout: each layer's keys (Hkv, B * S, D), sequence b in slots [b S, (b + 1) S), so the
    one-sequence kernels (rotary + KV write at flat slots) run unchanged and attention sees a (R, Hkv, S, D) view
    of the R sequences from `first` on. split_keys: the attention's fixed split size (`tree_attention`)."""

    first: int
    slots: int          # S, per sequence
    split_keys: int

    def view(self, layer: torch.Tensor, count: int) -> torch.Tensor:
        heads, total, dim = layer.shape
        return layer.as_strided((count, heads, self.slots, dim), (self.slots * dim, total * dim, dim, 1),
                                layer.storage_offset() + self.first * self.slots * dim)


ONE_TOKEN = _FusedKernels(gemv, gemv_gated, gemv_qkv_rope)          # `specdec.kernels.gemv`: one query
ROWS = _FusedKernels(rows_linear, rows_gated, rows_qkv_rope)        # `specdec.kernels.gemm_rows`: 2..64 queries


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the native forward cannot run `model` exactly as HF does, or None if it can."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "model") or not hasattr(model, "config"):
        return f"{type(model).__name__} is not a transformers causal LM with a decoder body"
    config = model.config.get_text_config()
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False):
        return "only a bias-free SiLU-gated MLP is supported"
    rope_type = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope_type not in STATIC_ROPE:
        return f"rope type {rope_type!r} is not one of {', '.join(STATIC_ROPE)}"
    attention = model.model.layers[0].self_attn
    if getattr(attention, "q_norm", None) is not None or attention.o_proj.bias is not None:
        return "q/k norms or an output-projection bias are not supported"
    if next(model.parameters()).dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {next(model.parameters()).dtype} is not float32, float16 or bfloat16"
    return None


def _fuse(modules: Sequence[torch.nn.Linear], attribute: str = "weight") -> torch.Tensor | None:
    """One tensor of the modules' weights (or biases) stacked by rows; each module's own becomes a view of it."""
    parts = [getattr(module, attribute) for module in modules]
    if any(part is None for part in parts):
        return None
    fused = torch.cat([part.detach() for part in parts])
    start = 0
    for module, part in zip(modules, parts):
        getattr(module, attribute).data = fused[start: start + part.shape[0]]
        start += part.shape[0]
    return fused


class NativeLlama:
    """The forward of a loaded Llama/Mistral/Qwen2-style `model` on a `StaticBackend` buffer of `max_len` slots."""

    def __init__(self, model: PreTrainedModel, max_len: int, one_token_gemv: bool = True, rows_gemm: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the native forward cannot run {type(model).__name__}: {reason}")
        config, inner = model.config.get_text_config(), model.model
        attention = inner.layers[0].self_attn
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_q_heads
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.eps = inner.norm.variance_epsilon
        with torch.no_grad():
            self.layers = [_Layer(
                layer.input_layernorm.weight,
                _fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                _fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], "bias"),
                layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                _fuse([layer.mlp.gate_proj, layer.mlp.up_proj]), layer.mlp.down_proj.weight,
            ) for layer in inner.layers]
        self.embed, self.norm = inner.embed_tokens.weight, inner.norm.weight
        self.head = model.get_output_embeddings().weight
        # early_exit's first L layers (`_EarlyLayers`): its exit head maps h_L before the final norm and LM head
        self.exit_head = getattr(model, "exit_head", None)
        positions = torch.arange(max_len, device=self.head.device)[None]
        probe = torch.zeros(1, dtype=self.head.dtype, device=self.head.device)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(probe, positions)  # (1, S, D), in the model's dtype, scaling applied
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        # five launches a layer (`_forward_fused`): one-query steps with the GEMVs, 2..rows_max_queries queries with
        # the row GEMMs (at most gemm_rows.MAX_ROWS)
        self.one_token_gemv, self.rows_gemm, self.rows_max_queries = one_token_gemv, rows_gemm, ROWS_MAX_QUERIES

    def forward(self, buffer: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                prefix: int | torch.Tensor, block_mask: torch.Tensor, rows: BatchRows | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """T queries: `tokens`, `positions`, written at cache `slots` (all (T,) device ints); each sees the slots
        below `prefix` (P) and, of the block [P, P + W), the keys its row of `block_mask` ((T, W) device bool)
        allows. Returns (T, V) logits. No host reads: capturable as a CUDA graph.
        Batched (`rows`, a batched cache's layout): R sequences of T queries each, flattened to R * T; block_mask
        (R, T, W), prefix (R,) device ints (each sequence's own P; its block right behind it), slots flat in the
        buffer's row-major slot axis (`BatchRows`). keep: the (K,) flat queries the LM head scores ((K, V) logits;
        none: None, a prefill)."""
        count = tokens.shape[0]
        if count == 1 and self.one_token_gemv:
            return self._forward_fused(ONE_TOKEN, buffer, tokens, positions, slots, prefix, block_mask, rows, keep)
        if 1 < count <= min(self.rows_max_queries, MAX_ROWS) and self.rows_gemm:
            return self._forward_fused(ROWS, buffer, tokens, positions, slots, prefix, block_mask, rows, keep)
        hidden = F.embedding(tokens, self.embed)  # (T, H): the residual stream
        attended = torch.empty(count, self.num_q_heads, self.head_dim, dtype=hidden.dtype, device=hidden.device)
        delta = None  # what the last block adds to the stream (fused into the next norm)
        for index, layer in enumerate(self.layers):
            normed = add_rmsnorm(hidden, layer.input_norm, self.eps, delta)
            qkv = F.linear(normed, layer.qkv, layer.qkv_bias)
            keys, values = buffer[index, 0, 0], buffer[index, 1, 0]  # (Hkv, S_max, D)
            rope_cache(qkv, positions, slots, self.cos, self.sin, keys, values, self.num_q_heads)
            queries = qkv[:, : self.num_q_heads * self.head_dim].view(count, self.num_q_heads, self.head_dim)
            self._attend(queries, keys, values, prefix, block_mask, rows, attended)
            delta = F.linear(attended.view(count, -1), layer.out)
            normed = add_rmsnorm(hidden, layer.post_norm, self.eps, delta)
            delta = F.linear(silu_mul(F.linear(normed, layer.gate_up)), layer.down)
        if self.exit_head is not None:
            hidden, delta = self._exit(hidden + delta), None
        normed = add_rmsnorm(hidden, self.norm, self.eps, delta)
        if keep is not None:
            if not len(keep):
                return None
            normed = normed.index_select(0, keep)
        return F.linear(normed, self.head)

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: int | torch.Tensor,
                block_mask: torch.Tensor, rows: BatchRows | None, attended: torch.Tensor) -> None:
        """queries (count, Hq, D) over one layer's keys / values (Hkv, slots, D) -> attended (count, Hq, D)."""
        count, heads, dim = queries.shape
        if rows is None:
            tree_attention(queries.transpose(0, 1)[None], keys[None], values[None], block_mask, self.scale,
                           prefix_len=prefix, block_len=block_mask.shape[1], out=attended.transpose(0, 1)[None])
            return
        sequences, size, width = block_mask.shape
        tree_attention(queries.view(sequences, size, heads, dim).transpose(1, 2), rows.view(keys, sequences),
                       rows.view(values, sequences), block_mask, self.scale, prefix_len=prefix, block_len=width,
                       out=attended.view(sequences, size, heads, dim).transpose(1, 2), split_keys=rows.split_keys)

    def _forward_fused(self, kernels: _FusedKernels, buffer: torch.Tensor, tokens: torch.Tensor,
                       positions: torch.Tensor, slots: torch.Tensor, prefix: int | torch.Tensor,
                       block_mask: torch.Tensor, rows: BatchRows | None = None,
                       keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """`forward` in five launches a layer, the norms, rotary, cache write, SwiGLU gate and residual adds riding
        in the products (`kernels`: ONE_TOKEN's GEMVs or ROWS's row GEMMs): qkv, attention, o, gate_up, down."""
        count = tokens.shape[0]
        hidden = embedding(tokens, self.embed)  # (T, H), contiguous: the residual stream, updated in place
        heads, dim = self.num_q_heads, self.head_dim
        queries = torch.empty(count, heads * dim, dtype=hidden.dtype, device=hidden.device)
        attended = torch.empty(count, heads, dim, dtype=hidden.dtype, device=hidden.device)
        for index, layer in enumerate(self.layers):
            keys, values = buffer[index, 0, 0], buffer[index, 1, 0]  # (Hkv, S_max, D)
            kernels.qkv_rope(hidden, layer.qkv, positions, slots, self.cos, self.sin, keys, values, heads,
                             layer.input_norm, self.eps, layer.qkv_bias, queries)
            self._attend(queries.view(count, heads, dim), keys, values, prefix, block_mask, rows, attended)
            kernels.linear(attended.view(count, -1), layer.out, residual=hidden)
            kernels.linear(kernels.gated(hidden, layer.gate_up, layer.post_norm, self.eps), layer.down,
                           residual=hidden)
        if self.exit_head is not None:
            hidden = self._exit(hidden)
        if keep is not None:
            if not len(keep):
                return None
            if len(keep) != count:
                hidden = hidden.index_select(0, keep)
                kernels = ONE_TOKEN if len(keep) == 1 and self.one_token_gemv else ROWS
        return kernels.linear(hidden, self.head, self.norm, self.eps)

    def _exit(self, hidden: torch.Tensor) -> torch.Tensor:
        """The exit head's map of h_L (its own torch ops: a few launches), back in the stream's dtype and layout."""
        return self.exit_head(hidden).to(hidden.dtype).contiguous()


class NativeBackend(GraphBackend):
    """`GraphBackend` whose every step (graphs, prefill chunks, eager fallbacks) runs `NativeLlama`'s forward."""

    def __init__(self, model: PreTrainedModel, max_len: int | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, native: NativeLlama | None = None):
        super().__init__(model, max_len, buckets, attention=None)
        if not kernel_available(self.device):
            raise ValueError("the native forward needs Triton on a CUDA device (or TRITON_INTERPRET=1)")
        # `native`: another backend's forward of this model (its fused weights shared), if it covers max_len
        self.native = native if native is not None and native.cos.shape[0] >= self.max_len else NativeLlama(
            model, self.max_len)

    def chain_forward(self, step: _Step) -> Callable[[], torch.Tensor]:
        """The step's forward with its block mask built once (a chain's stays [[True]] throughout)."""
        block_mask = step.block_flat.view(step.size, step.width) != 0
        return lambda: self.native.forward(step.state.buffer, step.tokens, step.positions, step.write_slots,
                                           step.prefix, block_mask)

    def step_forward(self, step: _Step) -> torch.Tensor:
        return self.chain_forward(step)()

    @torch.inference_mode()
    def _eager_block(self, state: StaticState, tokens, positions, prefix: int, block_mask: torch.Tensor,
                     device_tokens: torch.Tensor | None) -> torch.Tensor:
        count = block_mask.shape[0]
        ids = self._block_ids(tokens, device_tokens)
        slots = self._positions(state.length, count)
        logits = self.native.forward(state.buffer, ids, torch.as_tensor(list(positions), device=self.device), slots,
                                     prefix, block_mask.to(self.device))
        state.length += count
        return logits


def native_backend(model: PreTrainedModel, max_len: int | None = None,
                   buckets: Sequence[int] = DEFAULT_BUCKETS) -> GraphBackend:
    """`NativeBackend` where the model and machine allow it, else `GraphBackend` (HF's modules) with a warning."""
    reason = unsupported_reason(model)
    if reason is None and not kernel_available(model.device):
        reason = "Triton or CUDA is unavailable"
    if reason is None:
        return NativeBackend(model, max_len, buckets)
    warnings.warn(f"native backend unavailable ({reason}); using the graph backend on HF's modules",
                  RuntimeWarning, stacklevel=2)
    return GraphBackend(model, max_len, buckets)
