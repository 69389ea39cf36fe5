"""Matrix-vector products for the one-token step, with the layer's small ops fused in: a layer in five launches.

At batch 1 a decode step is a chain of GEMVs, and each small kernel between them (a norm, the rotary, the SwiGLU
gate, a residual add) costs a few microseconds of launch and ramp however little it reads (issue 4: they were half
of the 1.1B step's distance from the weight-read floor). Here each GEMV takes its neighbours in:

    out = gemv(x, weight, norm=w, eps=e)            # RMSNorm of x as the prologue (each program recomputes the
                                                    # norm of the whole row: H floats from L2, nothing to launch)
    gemv(x, weight, residual=hidden)                # hidden += weight @ x in place: the residual add as epilogue
    act = gemv_gated(x, gate_up, norm=w, eps=e)     # silu(gate @ x^) * (up @ x^): the SwiGLU gate as epilogue
    gemv_qkv_rope(x, qkv, ...)                      # q, k, v projection + rotary + the K/V write into the cache

Roundings follow transformers' Llama modules (and `rmsnorm`, `rope_cache`, `silu_mul`): each linear output is
rounded to the dtype before the op that follows it, so the fused step equals the unfused one up to the order of
the float32 sums inside a dot product.

Each program owns BLOCK_N output rows (paired kernels: BLOCK_N rows and their partners, a half head dim or I rows
further) and reads their weights once: as one tile of whole rows where BLOCK_K covers the row (the sweep's winner
nearly everywhere: 1-8 rows a program, weights requested before the norm is computed), else BLOCK_K columns at a
time into a (BLOCK_N, BLOCK_K) float32 accumulator summed once at the end. Weights are (N, K), rows contiguous:
`nn.Linear`'s layout.
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import json
import os
from pathlib import Path

import torch

from specdec.kernels.tree_attention import _jit, interpret_mode, tl, triton

# ------------------------------------------------------------------------------------------------------ kernels


@_jit
def _inverse_rms(X, size, eps, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x ** 2) + eps) of the row X[0:size] (1.0 without NORM)."""
    total = 0.0
    if NORM:
        squares = tl.zeros((BLOCK_K,), tl.float32)
        for start in range(0, size, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(X + cols, mask=cols < size, other=0.0).to(tl.float32)
            squares += x * x
        total = tl.sum(squares, 0)
    return tl.rsqrt(total / size + eps)


@_jit
def _input(X, NormW, cols, ok, inv_rms, NORM: tl.constexpr):
    """The input chunk at `cols` in float32: x, or RMSNorm(x) rounded as transformers' LlamaRMSNorm does."""
    x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        weight = tl.load(NormW + cols, mask=ok, other=0.0).to(tl.float32)
        x = ((x * inv_rms).to(X.dtype.element_ty).to(tl.float32) * weight).to(X.dtype.element_ty).to(tl.float32)
    return x


@_jit
def _rows_dot(X, NormW, W, Bias, rows, row_ok, size, stride_w, eps, NORM: tl.constexpr, BIAS: tl.constexpr,
              WHOLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(W[rows] @ x^ + bias[rows]) rounded to W's dtype, returned in float32; x^ = RMSNorm(x) with NORM.
    WHOLE (BLOCK_K >= size): the whole row in one tile, its weights requested before the norm is computed (no serial
    pass over x ahead of the weight stream); else BLOCK_K columns at a time after a pass for the norm."""
    if WHOLE:
        cols = tl.arange(0, BLOCK_K)
        ok = cols < size
        w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)
        x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, 0) / size + eps)
        x = _input(X, NormW, cols, ok, inv_rms, NORM)
        out = tl.sum(w.to(tl.float32) * x[None, :], 1)
    else:
        inv_rms = _inverse_rms(X, size, eps, NORM, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for start in range(0, size, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            ok = cols < size
            x = _input(X, NormW, cols, ok, inv_rms, NORM)
            w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & ok[None, :],
                        other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, 1)
    if BIAS:
        out += tl.load(Bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    return out.to(W.dtype.element_ty).to(tl.float32)


@_jit
def _gemv_kernel(X, NormW, W, Bias, Out, size, rows_total, stride_w, eps, NORM: tl.constexpr, BIAS: tl.constexpr,
                 RESIDUAL: tl.constexpr, WHOLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < rows_total
    out = _rows_dot(X, NormW, W, Bias, rows, row_ok, size, stride_w, eps, NORM, BIAS, WHOLE, BLOCK_N, BLOCK_K)
    if RESIDUAL:  # Out is the residual stream: out = stream + delta, one rounding (as add_rmsnorm's add)
        out += tl.load(Out + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Out + rows, out.to(Out.dtype.element_ty), mask=row_ok)


@_jit
def _gemv_gated_kernel(X, NormW, W, Out, size, width, stride_w, eps, NORM: tl.constexpr, WHOLE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # gate rows; their up rows are `width` further
    row_ok = rows < width
    gate = _rows_dot(X, NormW, W, W, rows, row_ok, size, stride_w, eps, NORM, False, WHOLE, BLOCK_N, BLOCK_K)
    up = _rows_dot(X, NormW, W, W, rows + width, row_ok, size, stride_w, eps, NORM, False, WHOLE, BLOCK_N, BLOCK_K)
    activated = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + rows, (activated * up).to(Out.dtype.element_ty), mask=row_ok)


@_jit
def _gemv_qkv_rope_kernel(X, NormW, W, Bias, Queries, Keys, Values, Cos, Sin, Positions, Slots, size, stride_w,
                          eps, stride_rope, stride_kh, stride_ks, stride_vh, stride_vs, num_q_heads, num_kv_heads,
                          HALF: tl.constexpr, PER_HEAD: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr,
                          WHOLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    head = tl.program_id(0) // PER_HEAD  # [0, Hq) q heads, then Hkv k heads, then Hkv v heads
    dims = (tl.program_id(0) % PER_HEAD) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the first half of the head
    ok = dims < HALF
    rows = head * 2 * HALF + dims
    x1 = _rows_dot(X, NormW, W, Bias, rows, ok, size, stride_w, eps, NORM, BIAS, WHOLE, BLOCK_N, BLOCK_K)
    x2 = _rows_dot(X, NormW, W, Bias, rows + HALF, ok, size, stride_w, eps, NORM, BIAS, WHOLE, BLOCK_N, BLOCK_K)
    position = tl.load(Positions)
    slot = tl.load(Slots)
    if head < num_q_heads + num_kv_heads:  # rotate, as rope_cache: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
        table = position * stride_rope + dims
        cos1 = tl.load(Cos + table, mask=ok, other=0.0).to(tl.float32)
        cos2 = tl.load(Cos + table + HALF, mask=ok, other=0.0).to(tl.float32)
        sin1 = tl.load(Sin + table, mask=ok, other=0.0).to(tl.float32)
        sin2 = tl.load(Sin + table + HALF, mask=ok, other=0.0).to(tl.float32)
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
        if head < num_q_heads:
            tl.store(Queries + rows, y1.to(Queries.dtype.element_ty), mask=ok)
            tl.store(Queries + rows + HALF, y2.to(Queries.dtype.element_ty), mask=ok)
        else:
            key = Keys + (head - num_q_heads) * stride_kh + slot * stride_ks
            tl.store(key + dims, y1.to(Keys.dtype.element_ty), mask=ok)
            tl.store(key + HALF + dims, y2.to(Keys.dtype.element_ty), mask=ok)
    else:
        value = Values + (head - num_q_heads - num_kv_heads) * stride_vh + slot * stride_vs
        tl.store(value + dims, x1.to(Values.dtype.element_ty), mask=ok)
        tl.store(value + HALF + dims, x2.to(Values.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------- launchers

# (kind, rows, size) -> (BLOCK_N, BLOCK_K, num_warps, num_stages), the fastest of a sweep on an H100 at the 1.1B,
# 7B and zoo shapes (`python3 evals/scripts/gemv_bench.py --out DIR`, evals/results/h100_gemv_bench.json);
# kind: "plain", "norm", "residual", "gated" (rows = I), "qkv". Whole-row tiles of 1-8 rows won nearly everywhere.
TUNED: dict[tuple[str, int, int], tuple[int, int, int, int]] = {
    ("gated", 2048, 768): (4, 1024, 4, 1),
    ("gated", 5632, 2048): (2, 2048, 8, 1),
    ("gated", 11008, 4096): (1, 4096, 4, 1),
    ("norm", 8192, 768): (8, 1024, 4, 1),
    ("norm", 32000, 2048): (2, 2048, 8, 1),
    ("norm", 32000, 4096): (1, 4096, 4, 1),
    ("qkv", 1280, 768): (2, 1024, 4, 1),
    ("qkv", 2560, 2048): (1, 2048, 4, 1),
    ("qkv", 12288, 4096): (2, 4096, 8, 1),
    ("residual", 768, 768): (2, 1024, 8, 1),
    ("residual", 768, 2048): (4, 2048, 8, 1),
    ("residual", 2048, 2048): (8, 2048, 8, 1),
    ("residual", 2048, 5632): (4, 8192, 8, 1),
    ("residual", 4096, 4096): (8, 1024, 4, 3),
    ("residual", 4096, 11008): (2, 16384, 4, 1),
}


def read_config_table(path: str | Path, key: tuple[str, ...], what: str) -> dict[tuple, tuple[int, int, int, int]]:
    """A sweep's table, JSON [{"kind", <the other `key` fields, ints>, "config": [BLOCK_N, BLOCK_K, num_warps,
    num_stages]}, ...] -> {key values: config}; a file that is not such a table is a clear ValueError."""
    try:
        entries = json.loads(Path(path).read_text())
        table = {tuple(str(e[f]) if f == "kind" else int(e[f]) for f in key): tuple(int(v) for v in e["config"])
                 for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read a {what} config table from {path}: {error}") from error
    if any(len(config) != 4 or min(config) < 1 for config in table.values()):
        raise ValueError(f"{path}: each config must be 4 positive ints (BLOCK_N, BLOCK_K, num_warps, num_stages)")
    return table


def load_tuned(path: str | Path) -> None:
    """Add a sweep's table (gemv_bench.py's tuned.json: [{"kind", "rows", "size", "config"}, ...]) to `TUNED`.
    The environment variable SPECDEC_GEMV_TUNED names one to load at import."""
    TUNED.update(read_config_table(path, ("kind", "rows", "size"), "GEMV"))


if os.environ.get("SPECDEC_GEMV_TUNED"):
    load_tuned(os.environ["SPECDEC_GEMV_TUNED"])


def gemv_config(kind: str, rows: int, size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a `kind` GEMV of `rows` outputs over `size` inputs: the tuned
    entry, else what won the sweep at other shapes: 2 rows a program (many programs in flight: the weight stream
    needs them) over the whole row, or 1024-column chunks past 16k. The interpreter wants few, big tiles."""
    if interpret_mode():
        return 128, min(triton.next_power_of_2(size), 1024), 4, 1
    if (kind, rows, size) in TUNED:
        return TUNED[kind, rows, size]
    whole = triton.next_power_of_2(size)
    if whole > 16384:
        return 2, 1024, 8, 3
    return 2, whole, 8 if whole >= 2048 else 4, 1


def _vector(x: torch.Tensor, name: str) -> torch.Tensor:
    """A (K,) or (1, K) input with unit stride, as (K,)."""
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1 or x.stride(0) != 1:
        raise ValueError(f"{name} must be one row, (K,) or (1, K), with unit stride; got {tuple(x.shape)}")
    return x


def _check_weight(weight: torch.Tensor, size: int, norm: torch.Tensor | None) -> None:
    if weight.dim() != 2 or weight.shape[1] != size or weight.stride(1) != 1:
        raise ValueError(f"weight must be (N, {size}) with rows contiguous, got {tuple(weight.shape)}")
    if norm is not None and norm.shape != (size,):
        raise ValueError(f"norm weight must be ({size},), got {tuple(norm.shape)}")


def _gated_width(gate_up: torch.Tensor) -> int:
    """I of a [gate; up] (2I, K) weight."""
    if gate_up.shape[0] % 2:
        raise ValueError(f"gate_up must have an even number of rows ([gate; up]), got {gate_up.shape[0]}")
    return gate_up.shape[0] // 2


def _check_qkv(qkv: torch.Tensor, size: int, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, num_q_heads: int, bias: torch.Tensor | None) -> None:
    """qkv ((Hq + 2 Hkv) D, K), keys/values (Hkv, S, D) with unit stride along D, cos/sin (S_pos, D), D even."""
    num_kv_heads, _, head_dim = keys.shape
    if (qkv.shape[0] != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2 or keys.stride(2) != 1
            or values.stride(2) != 1 or cos.shape != sin.shape or cos.shape[1] != head_dim):
        raise ValueError(f"expected qkv ((Hq + 2 Hkv) D, K) = ({(num_q_heads + 2 * num_kv_heads) * head_dim}, "
                         f"{size}), keys/values (Hkv, S, D) and cos/sin (S_pos, D) with an even D; got "
                         f"{tuple(qkv.shape)}, {tuple(keys.shape)}, {tuple(cos.shape)}")
    if bias is not None and bias.shape != (qkv.shape[0],):
        raise ValueError(f"bias must be ({qkv.shape[0]},), got {tuple(bias.shape)}")


def _queries_buffer(queries: torch.Tensor | None, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """`queries`, checked to be a contiguous buffer of rows x width values, or a new (rows, width) one."""
    if queries is None:
        return torch.empty(rows, width, dtype=like.dtype, device=like.device)
    if queries.numel() != rows * width or not queries.is_contiguous():
        raise ValueError(f"queries must be a contiguous buffer of {rows} x {width} (rows x Hq D) values")
    return queries


def _head_tiles(head_dim: int, block_n: int) -> tuple[int, int, int]:
    """(HALF, BLOCK_N, PER_HEAD) of a qkv + rotary launch: each program takes BLOCK_N of a head's first-half dims
    (and their partners HALF further), PER_HEAD programs a head."""
    half = head_dim // 2
    block_n = min(block_n, max(16, triton.next_power_of_2(half)))
    return half, block_n, triton.cdiv(half, block_n)


def gemv(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-6,
         bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """weight (N, K) @ x (K,) [+ bias] -> (1, N) in weight's dtype.

    norm:     (K,) RMSNorm weight: x is normalised first (eps), as transformers' LlamaRMSNorm
    residual: (N,) or (1, N) tensor: the product is added to it in place (one rounding) and it is returned
    """
    x = _vector(x, "x")
    size, rows = x.shape[0], weight.shape[0]
    _check_weight(weight, size, norm)
    if bias is not None and bias.shape != (rows,):
        raise ValueError(f"bias must be ({rows},), got {tuple(bias.shape)}")
    out = torch.empty(1, rows, dtype=weight.dtype, device=x.device) if residual is None else residual
    if out.numel() != rows or not out.is_contiguous():
        raise ValueError(f"residual must be a contiguous (N,) or (1, N) = ({rows},) tensor, got {tuple(out.shape)}")
    kind = "residual" if residual is not None else "norm" if norm is not None else "plain"
    block_n, block_k, warps, stages = config or gemv_config(kind, rows, size)
    _gemv_kernel[(triton.cdiv(rows, block_n),)](
        x, x if norm is None else norm, weight, weight if bias is None else bias, out, size, rows, weight.stride(0),
        eps, NORM=norm is not None, BIAS=bias is not None, RESIDUAL=residual is not None, WHOLE=block_k >= size,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def gemv_gated(x: torch.Tensor, gate_up: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-6,
               config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """gate_up (2I, K) = [gate; up] rows -> silu(gate @ x^) * (up @ x^), (1, I); x^ = RMSNorm(x) if `norm`."""
    x = _vector(x, "x")
    size = x.shape[0]
    _check_weight(gate_up, size, norm)
    width = _gated_width(gate_up)
    out = torch.empty(1, width, dtype=gate_up.dtype, device=x.device)
    block_n, block_k, warps, stages = config or gemv_config("gated", width, size)
    _gemv_gated_kernel[(triton.cdiv(width, block_n),)](
        x, x if norm is None else norm, gate_up, out, size, width, gate_up.stride(0), eps,
        NORM=norm is not None, WHOLE=block_k >= size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    return out


def gemv_qkv_rope(x: torch.Tensor, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_q_heads: int,
                  norm: torch.Tensor | None = None, eps: float = 1e-6, bias: torch.Tensor | None = None,
                  queries: torch.Tensor | None = None,
                  config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """One token's attention input: qkv ((Hq + 2 Hkv) D, K) @ x^ [+ bias], the queries and keys rotated at
    `positions[0]` (cos, sin: (S_pos, D) tables), keys and values written at cache slot `slots[0]` of keys/values
    ((Hkv, S, D), unit stride along D). Returns the rotated queries, (1, Hq D) (written into `queries` if given).
    Equals F.linear + `rope_cache` for one token."""
    x = _vector(x, "x")
    size = x.shape[0]
    num_kv_heads, _, head_dim = keys.shape
    _check_weight(qkv, size, norm)
    _check_qkv(qkv, size, keys, values, cos, sin, num_q_heads, bias)
    queries = _queries_buffer(queries, 1, num_q_heads * head_dim, qkv)
    block_n, block_k, warps, stages = config or gemv_config("qkv", qkv.shape[0], size)
    half, block_n, per_head = _head_tiles(head_dim, block_n)
    _gemv_qkv_rope_kernel[((num_q_heads + 2 * num_kv_heads) * per_head,)](
        x, x if norm is None else norm, qkv, qkv if bias is None else bias, queries, keys, values, cos, sin,
        positions, slots, size, qkv.stride(0), eps, cos.stride(0), keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1), num_q_heads, num_kv_heads, HALF=half, PER_HEAD=per_head,
        NORM=norm is not None, BIAS=bias is not None, WHOLE=block_k >= size, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return queries
