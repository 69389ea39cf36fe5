"""The GEMVs of `gemv.py` for a verify step's T = 2..64 queries: each weight read once for all rows, the layer's
small ops fused in as there, so a T-query layer also runs in five launches.

A speculative verify step at batch 1 is still memory bound (64 rows against a (N, K) weight is 64 flops a weight
read), so like the one-token step it pays mostly for weight reads and launches; the unfused forward spends ~10
launches a layer (norm, cuBLAS qkv, rotary, attention, o, norm, gate_up, silu, down). Here:

    out = rows_linear(x, weight, norm=w, eps=e)      # x (M, K): RMSNorm of each row as the prologue
    rows_linear(x, weight, residual=hidden)          # hidden (M, N) += x @ weight^T in place
    act = rows_gated(x, gate_up, norm=w, eps=e)      # silu(x^ @ gate^T) * (x^ @ up^T), (M, I)
    rows_qkv_rope(x, qkv, positions, slots, ...)     # row m rotated at positions[m], its K/V to cache slot slots[m]

Roundings are `gemv.py`'s (transformers' Llama modules, `rmsnorm`, `rope_cache`, `silu_mul`): each row equals the
unfused ops up to the order of the float32 sums inside a dot product.

Each program owns BLOCK_N output features (paired kernels: those and their partners, a half head dim or I rows
further) for all M rows, padded to BLOCK_M = a power of two >= 16 (tl.dot's least). It walks K in BLOCK_K steps:
a (BLOCK_M, BLOCK_K) input tile (normalised in registers; the per-row 1/rms comes from a first pass over x) times
the (BLOCK_K, BLOCK_N) weight tile into a float32 accumulator. Weights are (N, K), rows contiguous: `nn.Linear`'s
layout. x is re-read by every program (from L2): M / BLOCK_N of the weight bytes, so wider tiles for more rows.
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import os
from pathlib import Path

import torch

from specdec.kernels.gemv import (_check_qkv, _check_weight, _gated_width, _head_tiles, _queries_buffer,
                                  read_config_table)
from specdec.kernels.tree_attention import _jit, interpret_mode, tl, triton

MAX_ROWS = 64  # more rows are a GEMM: cuBLAS's tiles win there

# ------------------------------------------------------------------------------------------------------ kernels


@_jit
def _row_inverse_rms(X, m, m_ok, stride_x, size, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """(BLOCK_M,) 1 / sqrt(mean(x ** 2) + eps) of each row of X (1.0 without NORM). (Wider loads than BLOCK_K
    measured slower on the H100: the registers they hold cost more than the serial steps they save.)"""
    total = tl.zeros((BLOCK_M,), tl.float32)
    if NORM:
        for start in range(0, size, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(X + m[:, None] * stride_x + cols[None, :], mask=m_ok[:, None] & (cols < size)[None, :],
                        other=0.0).to(tl.float32)
            total += tl.sum(x * x, 1)
    return tl.rsqrt(total / size + eps)


@_jit
def _input_tile(X, NormW, m, m_ok, cols, col_ok, stride_x, inv_rms, NORM: tl.constexpr, FP32_DOT: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) input at `cols`: x, or RMSNorm(x) rounded as gemv's `_input`, in X's dtype (float32
    with FP32_DOT)."""
    x = tl.load(X + m[:, None] * stride_x + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
    if NORM:
        weight = tl.load(NormW + cols, mask=col_ok, other=0.0).to(tl.float32)
        normed = (x.to(tl.float32) * inv_rms[:, None]).to(X.dtype.element_ty).to(tl.float32)
        x = (normed * weight[None, :]).to(X.dtype.element_ty)
    if FP32_DOT:
        x = x.to(tl.float32)
    return x


@_jit
def _weight_tile(W, features, feature_ok, cols, col_ok, stride_w, FP32_DOT: tl.constexpr):
    """W[features, cols] as the (BLOCK_K, BLOCK_N) right operand of tl.dot."""
    w = tl.load(W + features[:, None] * stride_w + cols[None, :], mask=feature_ok[:, None] & col_ok[None, :],
                other=0.0)
    if FP32_DOT:
        w = w.to(tl.float32)
    return tl.trans(w)


@_jit
def _dot(x, w, acc, FP32_DOT: tl.constexpr):
    if FP32_DOT:  # float32 weights (TF32 would round them) and the interpreter (which computes bf16 wrongly)
        return acc + tl.dot(x, w, input_precision="ieee")
    return acc + tl.dot(x, w)


@_jit
def _products(X, NormW, W, Bias, m, m_ok, features, feature_ok, partner, size, stride_x, stride_w, eps,
              NORM: tl.constexpr, BIAS: tl.constexpr, PAIRED: tl.constexpr, FP32_DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x^ @ W[features]^T [+ bias] for the (BLOCK_M, BLOCK_N) tile, rounded to W's dtype, in float32; x^ = RMSNorm(x)
    with NORM. With PAIRED also the same for the features `partner` rows further (else zeros), on the same x tiles."""
    inv_rms = _row_inverse_rms(X, m, m_ok, stride_x, size, eps, NORM, BLOCK_M, BLOCK_K)
    first = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    second = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in range(0, size, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < size
        x = _input_tile(X, NormW, m, m_ok, cols, col_ok, stride_x, inv_rms, NORM, FP32_DOT)
        first = _dot(x, _weight_tile(W, features, feature_ok, cols, col_ok, stride_w, FP32_DOT), first, FP32_DOT)
        if PAIRED:
            w = _weight_tile(W, features + partner, feature_ok, cols, col_ok, stride_w, FP32_DOT)
            second = _dot(x, w, second, FP32_DOT)
    if BIAS:
        first += tl.load(Bias + features, mask=feature_ok, other=0.0).to(tl.float32)[None, :]
        if PAIRED:
            second += tl.load(Bias + features + partner, mask=feature_ok, other=0.0).to(tl.float32)[None, :]
    return first.to(W.dtype.element_ty).to(tl.float32), second.to(W.dtype.element_ty).to(tl.float32)


@_jit
def _rows_linear_kernel(X, NormW, W, Bias, Out, count, size, features_total, stride_x, stride_w, stride_o, eps,
                        NORM: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, FP32_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < features_total
    out, _ = _products(X, NormW, W, Bias, m, m_ok, features, feature_ok, 0, size, stride_x, stride_w, eps, NORM,
                       BIAS, False, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    target = Out + m[:, None] * stride_o + features[None, :]
    ok = m_ok[:, None] & feature_ok[None, :]
    if RESIDUAL:  # Out is the residual stream: out = stream + delta, one rounding (as add_rmsnorm's add)
        out += tl.load(target, mask=ok, other=0.0).to(tl.float32)
    tl.store(target, out.to(Out.dtype.element_ty), mask=ok)


@_jit
def _rows_gated_kernel(X, NormW, W, Out, count, size, width, stride_x, stride_w, stride_o, eps, NORM: tl.constexpr,
                       FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # gate rows; their up rows are `width` further
    feature_ok = features < width
    gate, up = _products(X, NormW, W, W, m, m_ok, features, feature_ok, width, size, stride_x, stride_w, eps, NORM,
                         False, True, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    activated = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + m[:, None] * stride_o + features[None, :], (activated * up).to(Out.dtype.element_ty),
             mask=m_ok[:, None] & feature_ok[None, :])


@_jit
def _rows_qkv_rope_kernel(X, NormW, W, Bias, Queries, Keys, Values, Cos, Sin, Positions, Slots, count, size,
                          stride_x, stride_w, stride_q, eps, stride_rope, stride_kh, stride_ks, stride_vh, stride_vs,
                          num_q_heads, num_kv_heads, HALF: tl.constexpr, PER_HEAD: tl.constexpr, NORM: tl.constexpr,
                          BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    head = tl.program_id(0) // PER_HEAD  # [0, Hq) q heads, then Hkv k heads, then Hkv v heads
    dims = (tl.program_id(0) % PER_HEAD) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the first half of the head
    ok = dims < HALF
    features = head * 2 * HALF + dims
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    x1, x2 = _products(X, NormW, W, Bias, m, m_ok, features, ok, HALF, size, stride_x, stride_w, eps, NORM, BIAS,
                       True, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    tile_ok = m_ok[:, None] & ok[None, :]
    slots = tl.load(Slots + m, mask=m_ok, other=0)
    if head < num_q_heads + num_kv_heads:  # rotate, as rope_cache: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
        table = tl.load(Positions + m, mask=m_ok, other=0)[:, None] * stride_rope + dims[None, :]
        cos1 = tl.load(Cos + table, mask=tile_ok, other=0.0).to(tl.float32)
        cos2 = tl.load(Cos + table + HALF, mask=tile_ok, other=0.0).to(tl.float32)
        sin1 = tl.load(Sin + table, mask=tile_ok, other=0.0).to(tl.float32)
        sin2 = tl.load(Sin + table + HALF, mask=tile_ok, other=0.0).to(tl.float32)
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
        if head < num_q_heads:
            query = Queries + m[:, None] * stride_q + features[None, :]
            tl.store(query, y1.to(Queries.dtype.element_ty), mask=tile_ok)
            tl.store(query + HALF, y2.to(Queries.dtype.element_ty), mask=tile_ok)
        else:
            key = Keys + (head - num_q_heads) * stride_kh + slots[:, None] * stride_ks + dims[None, :]
            tl.store(key, y1.to(Keys.dtype.element_ty), mask=tile_ok)
            tl.store(key + HALF, y2.to(Keys.dtype.element_ty), mask=tile_ok)
    else:
        value = Values + (head - num_q_heads - num_kv_heads) * stride_vh + slots[:, None] * stride_vs + dims[None, :]
        tl.store(value, x1.to(Values.dtype.element_ty), mask=tile_ok)
        tl.store(value + HALF, x2.to(Values.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------------- launchers

SHARED_BYTES = 160 * 1024  # what the default configs may stage in shared memory (the H100 has 227 KiB a block)

# (kind, BLOCK_M, rows, size) -> (BLOCK_N, BLOCK_K, num_warps, num_stages), kinds as gemv's TUNED ("plain", "norm",
# "residual", "gated" with rows = I, "qkv"); a sweep's winners (`evals/scripts/gemm_rows_bench.py --out DIR` writes
# DIR/rows_tuned.json; SPECDEC_ROWS_TUNED=that file loads it at import).
TUNED: dict[tuple[str, int, int, int], tuple[int, int, int, int]] = {}


def load_tuned(path: str | Path) -> None:
    """Add a sweep's table ([{"kind", "block_m", "rows", "size", "config"}, ...]) to `TUNED`."""
    TUNED.update(read_config_table(path, ("kind", "block_m", "rows", "size"), "rows-GEMM"))


if os.environ.get("SPECDEC_ROWS_TUNED"):
    load_tuned(os.environ["SPECDEC_ROWS_TUNED"])


def block_rows(m: int) -> int:
    """BLOCK_M for m rows: the next power of two, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(m))


def rows_config(kind: str, m: int, rows: int, size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a `kind` product of `m` rows, `rows` outputs (gated: I), `size`
    inputs: the tuned entry, else what did well in a sweep at the 1.1B, 7B and zoo shapes on the H100 (within ~10%
    of each shape's best at M = 2; at M = 64 the 7B shape's best): narrow programs (many of them keep the weight
    stream going) where no norm is computed, wider ones where every program pays a pass over x for it. The
    interpreter wants few, big tiles."""
    if interpret_mode():
        return 128, min(triton.next_power_of_2(size), 1024), 4, 1
    block_m = block_rows(m)
    if (kind, block_m, rows, size) in TUNED:
        return TUNED[kind, block_m, rows, size]
    small = block_m == 16
    if kind in ("plain", "residual"):
        return (32, 256, 4, 5) if small else (32, 128, 4, 5)
    if kind == "qkv":  # BLOCK_N: at most half a head
        return (32, 256, 4, 3) if small else (64, 128, 8, 3)
    if rows <= 4096:  # the zoo's gate/up
        return 16, 256, 4, 3
    return 64 if small or kind == "gated" else 128, 128, 8, 3


def _fitted(config: tuple[int, int, int, int], block_m: int, weight_tiles: int,
            element_size: int) -> tuple[int, int, int, int]:
    """A default `config` with fewer stages (then narrower K steps) until its staged tiles fit in SHARED_BYTES:
    float32 weights take twice the bfloat16 bytes the table was measured with."""
    block_n, block_k, warps, stages = config
    staged = lambda: stages * (block_m + weight_tiles * block_n) * block_k * element_size  # noqa: E731
    while staged() > SHARED_BYTES and stages > 2:
        stages -= 1
    while staged() > SHARED_BYTES and block_k > 32:
        block_k //= 2
    return block_n, block_k, warps, stages


def _launch_params(kind: str, x: torch.Tensor, weight: torch.Tensor, rows: int, weight_tiles: int,
                   config: tuple[int, int, int, int] | None) -> tuple[int, int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, FP32_DOT) for a launch."""
    block_m = block_rows(x.shape[0])
    if config is None:
        config = _fitted(rows_config(kind, x.shape[0], rows, x.shape[1]), block_m, weight_tiles,
                         weight.element_size())
    fp32_dot = interpret_mode() or weight.dtype == torch.float32
    return (block_m, *config, fp32_dot)


def _rows(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None) -> tuple[int, int]:
    """(M, K) of an input of 1..MAX_ROWS rows with unit column stride, in weight's dtype; checks the weight too."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.stride(1) != 1:
        raise ValueError(f"x must be (M, K) with 1 <= M <= {MAX_ROWS} and unit column stride, got "
                         f"{tuple(x.shape)}; more rows are a GEMM (F.linear)")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {weight.dtype}; cast one of them")
    _check_weight(weight, x.shape[1], norm)
    return x.shape


def rows_linear(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-6,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T [+ bias] -> (M, N) in weight's dtype.

    norm:     (K,) RMSNorm weight: each row of x is normalised first (eps), as transformers' LlamaRMSNorm
    residual: contiguous (M, N) tensor: the product is added to it in place (one rounding) and it is returned
    """
    count, size = _rows(x, weight, norm)
    features = weight.shape[0]
    if bias is not None and bias.shape != (features,):
        raise ValueError(f"bias must be ({features},), got {tuple(bias.shape)}")
    out = torch.empty(count, features, dtype=weight.dtype, device=x.device) if residual is None else residual
    if out.shape != (count, features) or not out.is_contiguous():
        raise ValueError(f"residual must be a contiguous (M, N) = ({count}, {features}) tensor, got "
                         f"{tuple(out.shape)}")
    kind = "residual" if residual is not None else "norm" if norm is not None else "plain"
    block_m, block_n, block_k, warps, stages, fp32_dot = _launch_params(kind, x, weight, features, 1, config)
    _rows_linear_kernel[(triton.cdiv(features, block_n),)](
        x, x if norm is None else norm, weight, weight if bias is None else bias, out, count, size, features,
        x.stride(0), weight.stride(0), features, eps, NORM=norm is not None, BIAS=bias is not None,
        RESIDUAL=residual is not None, FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return out


def rows_gated(x: torch.Tensor, gate_up: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-6,
               config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """gate_up (2I, K) = [gate; up] rows -> silu(x^ @ gate^T) * (x^ @ up^T), (M, I); x^ = RMSNorm(x) if `norm`."""
    count, size = _rows(x, gate_up, norm)
    width = _gated_width(gate_up)
    out = torch.empty(count, width, dtype=gate_up.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages, fp32_dot = _launch_params("gated", x, gate_up, width, 2, config)
    _rows_gated_kernel[(triton.cdiv(width, block_n),)](
        x, x if norm is None else norm, gate_up, out, count, size, width, x.stride(0), gate_up.stride(0), width,
        eps, NORM=norm is not None, FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return out


def rows_qkv_rope(x: torch.Tensor, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_q_heads: int,
                  norm: torch.Tensor | None = None, eps: float = 1e-6, bias: torch.Tensor | None = None,
                  queries: torch.Tensor | None = None,
                  config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """M tokens' attention input: qkv ((Hq + 2 Hkv) D, K) @ x^ [+ bias] for each row, row m's query and key rotated at
    `positions[m]` (cos, sin: (S_pos, D) tables), its key and value written at cache slot `slots[m]` of keys/values
    ((Hkv, S, D), unit stride along D); positions, slots: (M,) ints. Returns the rotated queries, (M, Hq D) (written
    into `queries` if given). Equals F.linear + `rope_cache` row for row."""
    count, size = _rows(x, qkv, norm)
    num_kv_heads, _, head_dim = keys.shape
    width = num_q_heads * head_dim
    _check_qkv(qkv, size, keys, values, cos, sin, num_q_heads, bias)
    if positions.shape != (count,) or slots.shape != (count,):
        raise ValueError(f"positions and slots must be ({count},), one per row; got {tuple(positions.shape)}, "
                         f"{tuple(slots.shape)}")
    queries = _queries_buffer(queries, count, width, qkv)
    block_m, block_n, block_k, warps, stages, fp32_dot = _launch_params("qkv", x, qkv, qkv.shape[0], 2, config)
    half, block_n, per_head = _head_tiles(head_dim, block_n)
    _rows_qkv_rope_kernel[((num_q_heads + 2 * num_kv_heads) * per_head,)](
        x, x if norm is None else norm, qkv, qkv if bias is None else bias, queries, keys, values, cos, sin,
        positions, slots, count, size, x.stride(0), qkv.stride(0), width, eps, cos.stride(0), keys.stride(0),
        keys.stride(1), values.stride(0), values.stride(1), num_q_heads, num_kv_heads, HALF=half,
        PER_HEAD=per_head, NORM=norm is not None, BIAS=bias is not None, FP32_DOT=fp32_dot, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return queries
