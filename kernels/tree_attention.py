"""Tree attention: T = N+1 queries ([root] + N drafted nodes) over a KV of length P + T, as one Triton kernel.

Terms: the **prefix** is the committed cache (P keys, every query sees all of it); the **tree block** is the last T
keys (the root and the nodes themselves), seen through a (T, T) **tree mask** (True = may attend): row 0, the root,
sees column 0 only; row 1+i sees the root, node i's ancestors and node i. Worked example (tree "a b c" + "a d",
parents [-1, 0, 1, 0]), rows/columns = [root, a, b, c, d]:

    root  1 . . . .
    a     1 1 . . .
    b     1 1 1 . .
    c     1 1 1 1 .
    d     1 1 . . 1

The kernel (DESIGN §3): each program takes one (batch, kv head) and a tile of its GQA query heads x tree queries
packed as rows (row r = g*T + t: query head kv_head*G + g, tree query t), so the prefix KV is read once for all of
them. It streams the prefix without any mask, then the tree block with the tree mask, in one online softmax (fp32
accumulators, running max and sum, exp2 with log2(e) folded into the scale). Long prefixes with few (batch, kv head)
programs are split over a grid axis; each split writes a partial (out, lse) and `_merge_kernel` combines them by
log-sum-exp. The last split also takes the tree block.

    out = tree_attention(q, k, v, tree_mask, scale)     # q (B, Hq, T, D); k, v (B, Hkv, P+T, D) -> (B, Hq, T, D)
    register_tree_attention()                             # then model.set_attn_implementation("specdec_tree")
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import functools
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton wheel (macOS, Windows): the registered attention function falls back to SDPA
    triton = tl = None

LOG2E = 1.4426950408889634
MIN_KEYS_PER_SPLIT = 256  # a split-KV chunk below this costs more in the merge than it saves
SMALL_STEP_QUERIES, SMALL_STEP_MIN_KEYS = 16, 64  # steps of <= 16 queries: splits down to 64 keys (`tree_attention`)
LONG_SPLIT_KEYS = 2048  # splits this long, of programs that share their keys, gain from a second wave


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def interpret_mode() -> bool:
    """Triton runs on the CPU through its interpreter (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of `device`."""
    return triton is not None and (device.type == "cuda" or interpret_mode())


# ------------------------------------------------------------------------------------------------------ kernels

@_jit
def _softmax_step(scores, v, m_i, l_i, acc, FP32_MATH: tl.constexpr):
    """One online-softmax update with a (BLOCK_M, BLOCK_N) block of log2-scaled scores (-inf = masked)."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP32_MATH:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@_jit
def _scores(q, k, qk_scale, FP32_MATH: tl.constexpr):
    if FP32_MATH:
        return tl.dot(q, k, input_precision="ieee") * qk_scale
    return tl.dot(q, k) * qk_scale


@_jit
def _tree_attention_kernel(
    Q, K, V, Mask, Out, PartOut, PartLse, prefix_arg, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mi, stride_mj,
    num_kv_heads, T, W, D, num_splits, split_keys,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREFIX_IN_TENSOR: tl.constexpr, PREFIX_PER_ROW: tl.constexpr, MASK_FULL_WIDTH: tl.constexpr,
    SPLIT: tl.constexpr, FP32_MATH: tl.constexpr,
):
    batch_head = tl.program_id(0)
    split = tl.program_id(1)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    if PREFIX_PER_ROW:  # (B,) lengths: each batch row its own prefix, its tree block right behind it
        prefix_len = tl.load(prefix_arg + batch).to(tl.int32)
    elif PREFIX_IN_TENSOR:
        prefix_len = tl.load(prefix_arg).to(tl.int32)
    else:
        prefix_len = prefix_arg

    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = g * T + t
    row_ok = rows < GROUP * T
    query = rows % T
    head = kv_head * GROUP + rows // T
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = tl.load(Q + batch * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qt
                + dims[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if FP32_MATH:
        q = q.to(tl.float32)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked block leaves alpha = 1, p = 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Prefix keys [start, end) of this split: no mask but the bounds. split_keys > 0: splits of that many keys
    # (a row's sums then depend on its own prefix only, not on how many splits its neighbours need)
    if split_keys > 0:
        chunk = split_keys
    else:
        chunk = tl.cdiv(tl.cdiv(prefix_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, prefix_len)
    for block in range(start, end, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        k = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
                    mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.where(col_ok[None, :], _scores(q, k, qk_scale, FP32_MATH), float("-inf"))
        m_i, l_i, acc = _softmax_step(scores, v, m_i, l_i, acc, FP32_MATH)

    # Tree block: keys [P, P + W) through the tree mask (W = T for a tree), in the last split only.
    tree_end = tl.where(split == num_splits - 1, W, 0)
    mask_col0 = prefix_len if MASK_FULL_WIDTH else 0
    for block in range(0, tree_end, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_ok = cols < W
        k = tl.load(k_base + (prefix_len + cols[None, :]) * stride_kn + dims[:, None] * stride_kd,
                    mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(v_base + (prefix_len + cols[:, None]) * stride_vn + dims[None, :] * stride_vd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        allowed = tl.load(Mask + batch * stride_mb + query[:, None] * stride_mi
                          + (mask_col0 + cols[None, :]) * stride_mj, mask=row_ok[:, None] & col_ok[None, :], other=0)
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.where(allowed != 0, _scores(q, k, qk_scale, FP32_MATH), float("-inf"))
        m_i, l_i, acc = _softmax_step(scores, v, m_i, l_i, acc, FP32_MATH)

    # A row that saw no key at all (only possible with P = 0 and an empty mask row) gets zeros, lse = -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    io_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:  # partials (B, Hq, S, T, D) and lse (B, Hq, S, T), contiguous fp32, log2 domain
        part_row = ((batch * num_kv_heads * GROUP + head) * num_splits + split) * T + query
        tl.store(PartOut + part_row[:, None] * D + dims[None, :], out, mask=io_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + part_row, lse, mask=row_ok)
    else:
        tl.store(Out + batch * stride_ob + head[:, None] * stride_oh + query[:, None] * stride_ot
                 + dims[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=io_mask)


@_jit
def _merge_kernel(PartOut, PartLse, Out, num_rows, num_heads, T, D, num_splits,
                  stride_ob, stride_oh, stride_ot, stride_od,
                  ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """ROWS rows r = (batch * Hq + head) * T + query of out = sum_s 2^lse_s * out_s / sum_s 2^lse_s. Each row reads
    all its splits as one (BLOCK_S, BLOCK_D) tile: one memory latency whatever the split count (a loop over splits
    waited for one load after another: 32 splits cost ~17 us at N = 1)."""
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    for index in range(ROWS):  # one row a program on a GPU; many in the interpreter
        row = tl.program_id(0) * ROWS + index
        if row < num_rows:
            query = row % T
            head = (row // T) % num_heads
            batch = row // (T * num_heads)
            part = (row // T) * num_splits * T + query + splits * T  # partial row of each split
            lse = tl.load(PartLse + part, mask=split_ok, other=float("-inf"))
            top = tl.max(lse, 0)
            top = tl.where(top > float("-inf"), top, 0.0)  # a row that saw no key: every weight is 0
            weight = tl.exp2(lse - top)
            total = tl.sum(weight, 0)
            parts = tl.load(PartOut + part[:, None] * D + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                            other=0.0)
            out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
            tl.store(Out + batch * stride_ob + head * stride_oh + query * stride_ot + dims * stride_od,
                     out.to(Out.dtype.element_ty), mask=dim_ok)


# ----------------------------------------------------------------------------------------------------- launcher

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_kv_splits(programs: int, prefix_len: int, sm_count: int = 132, min_keys: int = MIN_KEYS_PER_SPLIT,
                  row_tiles: int = 1) -> int:
    """Split the prefix when the (batch, kv head, row tile) programs cannot fill the SMs, keeping the grid to one
    wave and each split >= MIN_KEYS_PER_SPLIT keys. E.g. batch 1, 8 kv heads, 1 row tile, P = 4096 ->
    min(132 // 8, 16) = 16 splits. One wave, not ceil: 32 kv heads (7B) split 5 ways make 160 programs on 132 SMs,
    and 4 splits ran 1.1-1.4x faster at 2k-8k keys on the H100 (evals/results/h100_attention_split.txt).
    min_keys: the fewest prefix keys a split may get (`tree_attention`: 64 for steps of <= 16 queries).
    row_tiles: programs per (batch, kv head). Where several row tiles read the same keys (the later ones from L2),
    splits of >= LONG_SPLIT_KEYS keys are halved into a second wave: 1.1B shape, 64 queries (8 row tiles), 4 -> 8
    splits ran 1.08 / 1.13 / 1.30x faster at 8k / 16k / 32k keys, where one row tile (7B) gained nothing
    (evals/results/h100_attention_config.txt)."""
    if programs >= sm_count:
        return 1
    splits = max(1, min(sm_count // programs, prefix_len // min_keys, 64))
    if row_tiles > 1 and prefix_len >= splits * LONG_SPLIT_KEYS:
        splits = min(2 * splits, 64)
    return splits


def _block_sizes(rows: int, head_dim: int, small_step: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). tl.dot needs every side >= 16; the interpreter prefers
    big tiles. (evals/scripts/attention_config_bench.py sweeps the GPU ones.) small_step (2..16 queries, split into
    64-key chunks) with head dim <= 64: 32-key tiles, 2 stages, the sweep's best at N = 8 and 16 over 2k keys on
    the zoo and 1.1B shapes (zoo 9.8 -> 7.8 and 8.7 -> 6.8 us, 1.1B 9.6 -> 7.6 and 8.5, with the splits;
    evals/results/h100_attention_config_small.txt)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpret_mode():
        return min(max(16, triton.next_power_of_2(rows)), 256), 128, block_d, 4, 1
    block_m = min(max(16, triton.next_power_of_2(rows)), 64)
    if small_step and head_dim <= 64:
        return block_m, 32, block_d, 4, 2
    return block_m, 64, block_d, 4, 3


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor,
                   scale: float | None = None, prefix_len: int | torch.Tensor | None = None,
                   num_splits: int | None = None, block_len: int | None = None,
                   out: torch.Tensor | None = None, split_keys: int | None = None) -> torch.Tensor:
    """Attention of T tree queries over [prefix] + [tree block] keys; returns (B, Hq, T, D) in q's dtype.

    q:          (B, Hq, T, D); any strides
    k, v:       (B, Hkv, K, D) with Hq % Hkv == 0 (GQA, no repeat_kv); the prefix is keys [0, P), the tree block
                keys [P, P + W); keys from P + W on are ignored (the unused tail of a static cache)
    tree_mask:  (T, W) bool, True = may attend; or, without `block_len`, (T, >= P + T) bool whose columns are key
                positions (the tree block is then read at columns [P, P + T): the rows of an HF 4D mask); or
                (B, T, W): a tree mask per batch row
    scale:      softmax scale, default D ** -0.5
    prefix_len: P; None = K - W; a 0-d integer tensor on q's device keeps it on the device (CUDA graphs, static
                caches: no host sync; the split count is then chosen for P = K - W); a (B,) integer tensor: each
                batch row's own P (its tree block at its keys [P_b, P_b + W); batched decoding)
    num_splits: split-KV chunks of the prefix; None = `num_kv_splits`
    split_keys: split the prefix into chunks of this many keys (their count from K - W), whatever the batch and
                the tree: a row's sums then depend on its own keys only (batched decoding); overrides num_splits
    block_len:  W, the block's keys; None = T (a tree: the queries are the block). W > T: the queries were written
                somewhere inside a longer block (a drafter growing its tree, a chunk of a prefill)
    out:        (B, Hq, T, D), any strides: written in place of a new tensor (e.g. a (T, Hq, D) buffer, transposed)
    """
    batch, num_heads, tree_size, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads or k.shape != v.shape or (k.shape[0], k.shape[3]) != (batch, head_dim):
        raise ValueError(f"expected q (B, Hq, T, D) and k, v (B, Hkv, K, D) with Hq % Hkv == 0, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    block = tree_size if block_len is None else block_len
    per_row_mask = tree_mask.dim() == 3
    if per_row_mask and (tree_mask.shape[0] != batch or tree_mask.shape[2] != block):
        raise ValueError(f"a per-row tree_mask must be (B, T, W) = ({batch}, {tree_size}, {block}), "
                         f"got {tuple(tree_mask.shape)}")
    if tree_mask.dim() not in (2, 3) or tree_mask.shape[-2] != tree_size or tree_mask.shape[-1] < block:
        raise ValueError(f"tree_mask must be (T, W) or (T, >= P + T) with T = {tree_size}, W = {block}, "
                         f"got {tuple(tree_mask.shape)}")
    if out is not None and out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    prefix_in_tensor = isinstance(prefix_len, torch.Tensor)
    per_row_prefix = prefix_in_tensor and prefix_len.dim() == 1
    if per_row_prefix and prefix_len.shape[0] != batch:
        raise ValueError(f"prefix_len must be 0-d or (B,) = ({batch},), got {tuple(prefix_len.shape)}")
    host_prefix = kv_len - block if prefix_len is None or prefix_in_tensor else int(prefix_len)
    if host_prefix < 0 or host_prefix + block > kv_len:
        raise ValueError(f"prefix_len {host_prefix} + W {block} does not fit in the {kv_len} keys of k and v")
    group = num_heads // num_kv_heads
    small_step = tree_size <= SMALL_STEP_QUERIES
    # one-query steps keep the default tiles: the sweep did not rank the small ones above them there
    block_m, block_n, block_d, num_warps, num_stages = _block_sizes(group * tree_size, head_dim,
                                                                    small_step and tree_size > 1)
    row_tiles = triton.cdiv(group * tree_size, block_m)
    if num_splits is None:
        sm_count = _sm_count(q.device.index or 0) if q.is_cuda else 132
        # a step of few queries does little work per key: short splits that fill the SMs win (H100, 2k keys, kernel
        # + merge: at N = 1, 8, 16 the sweep's best had 16-32 splits of 64-128 keys, where this rule gave 8-16 of
        # 128-256; evals/results/h100_attention_config_small.txt). At N = 64 more splits lose (7B at 512 keys:
        # 2 splits 13.3 us, 4 16.6; evals/results/h100_attention_split.txt).
        min_keys = SMALL_STEP_MIN_KEYS if small_step else MIN_KEYS_PER_SPLIT
        num_splits = num_kv_splits(batch * num_kv_heads * row_tiles, host_prefix, sm_count, min_keys, row_tiles)
    if split_keys is not None:
        if split_keys < 1:
            raise ValueError(f"split_keys must be >= 1, got {split_keys}")
        chunk = split_keys
    else:
        chunk = triton.cdiv(triton.cdiv(max(host_prefix, 1), max(num_splits, 1)), block_n) * block_n
    num_splits = triton.cdiv(max(host_prefix, 1), chunk)  # the kernel's chunking: no split without prefix keys
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    part_out = part_lse = out  # unused without a split
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, tree_size, head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, tree_size, dtype=torch.float32, device=q.device)
    mask = tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask
    mask_strides = mask.stride() if per_row_mask else (0, *mask.stride())
    fp32_math = interpret_mode() or q.dtype == torch.float32  # the interpreter computes bf16 wrongly
    _tree_attention_kernel[(batch * num_kv_heads, num_splits, row_tiles)](
        q, k, v, mask, out, part_out, part_lse, prefix_len if prefix_in_tensor else host_prefix,
        (head_dim ** -0.5 if scale is None else scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        num_kv_heads, tree_size, block, head_dim, num_splits, split_keys or 0,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREFIX_IN_TENSOR=prefix_in_tensor,
        PREFIX_PER_ROW=per_row_prefix,
        MASK_FULL_WIDTH=block_len is None and tree_mask.shape[-1] != tree_size, SPLIT=num_splits > 1,
        FP32_MATH=fp32_math, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        rows = batch * num_heads * tree_size
        per_program = 256 if interpret_mode() else 1
        _merge_kernel[(triton.cdiv(rows, per_program),)](
            part_out, part_lse, out, rows, num_heads, tree_size, head_dim, num_splits, *out.stride(),
            ROWS=per_program, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------------------------------------------- reference

def tree_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                             tree_mask: torch.Tensor, scale: float | None = None,
                             dtype: torch.dtype = torch.float64, block_len: int | None = None) -> torch.Tensor:
    """Plain torch, computed in `dtype` (float64 = the oracle; q's dtype = the error baseline of the tests):
    repeat the kv heads, mask explicitly, softmax. Same shapes, arguments and result dtype as `tree_attention`."""
    tree_size, group = q.shape[2], q.shape[1] // k.shape[1]
    block = tree_size if block_len is None else block_len
    keys = k[:, :, : prefix_len + block].repeat_interleave(group, dim=1).to(dtype)
    values = v[:, :, : prefix_len + block].repeat_interleave(group, dim=1).to(dtype)
    scores = q.to(dtype) @ keys.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    allowed = torch.ones(tree_size, prefix_len + block, dtype=torch.bool, device=q.device)
    full_width = block_len is None and tree_mask.shape[1] != tree_size
    allowed[:, prefix_len:] = tree_mask[:, prefix_len: prefix_len + block] if full_width else tree_mask[:, :block]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1).nan_to_num(0.0) @ values).to(q.dtype)


# --------------------------------------------------------------------------- transformers attention registry

check_prefix_mask = True  # verify (one host sync per call) that the mask lets every query see the whole prefix;
# skipped while a CUDA graph is being captured or torch.compile traces. Set False for eager speed.
_UNSUPPORTED = ("softcap", "s_aux", "position_bias", "sinks")


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"specdec tree attention falls back to SDPA: {reason}", RuntimeWarning, stacklevel=3)


def _tree_rows(attention_mask: torch.Tensor, tree_size: int) -> tuple[torch.Tensor, bool]:
    """(T, K) bool rows of a 4D mask (float: > finfo.min / 2 means allowed) and whether they match the contract:
    the same for every batch row and head, the whole prefix allowed (checked only when `check_prefix_mask`)."""
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    rows = allowed[0, 0]
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if not check_prefix_mask or capturing or torch.compiler.is_compiling():
        return rows, True
    prefix_len = rows.shape[1] - tree_size
    valid = bool(rows[:, :prefix_len].all() & (allowed == rows).all())  # one sync
    return rows, valid


def tree_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, T, D), key/value (B, Hkv, K, D), mask (B, 1, T, K) float or
    bool or None -> ((B, T, Hq, D), None). The tree mask is the last T columns of the mask; without a mask, T = 1
    is a plain decode step. A static-cache backend passes the (T, T) tree mask and the cache length P (a 0-d
    device tensor) as `specdec_tree_mask` and `specdec_prefix_len`: the kernel then reads keys [0, P + T) only,
    without a host sync (CUDA graphs). Everything else (a causal prefill without a mask, a prefix that is not fully allowed,
    dropout, softcap, ...) goes to the "sdpa" function."""
    tree_size = query.shape[2]
    problem = None
    if not kernel_available(query.device):
        problem = "Triton or CUDA is unavailable"
        _warn_fallback(problem)
    elif dropout > 0.0 or any(kwargs.get(name) is not None for name in _UNSUPPORTED):
        problem = "dropout or an unsupported attention option"
    elif query.shape[-1] != value.shape[-1] or (attention_mask is not None and
                                                attention_mask.shape[-1] != key.shape[2]):
        problem = "query and value head dims differ, or the mask does not cover the keys"
    elif kwargs.get("specdec_tree_mask") is not None:  # a static cache: (T, T) tree mask, P on the device
        out = tree_attention(query, key, value, kwargs["specdec_tree_mask"], scaling,
                             prefix_len=kwargs["specdec_prefix_len"])
        return out.transpose(1, 2), None
    elif attention_mask is None:
        tree_mask = torch.ones(1, 1, dtype=torch.bool, device=query.device)
        problem = None if tree_size == 1 else "causal prefill"
    else:
        tree_mask, valid = _tree_rows(attention_mask, tree_size)
        problem = None if valid else "the mask hides part of the prefix"
    if problem is not None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    out = tree_attention(query, key, value, tree_mask, scaling)
    return out.transpose(1, 2), None


def register_tree_attention(name: str = "specdec_tree") -> str:
    """Register `tree_attention_forward` with transformers' `AttentionInterface` (and the "sdpa" mask builder
    under the same name, so padding masks are still built); returns the name. A model then opts in with
    `model.set_attn_implementation(name)`, or `from_pretrained(..., attn_implementation=name)`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, tree_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
