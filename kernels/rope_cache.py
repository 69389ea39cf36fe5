"""Rotary embedding of a step's queries and keys, and the keys' and values' write into a static KV cache: one
launch per layer instead of HF's ~15 small kernels (rotate_half, the products, two index copies).

    rope_cache(qkv, positions, slots, cos, sin, keys, values, num_q_heads)

qkv (T, (Hq + 2 Hkv) D): a fused projection's output, rows [q heads | k heads | v heads]; the queries are rotated in
place, the rotated keys and the values go to `keys[:, slots[t]]`, `values[:, slots[t]]` ((Hkv, S, D) views of the
static cache). cos, sin (S_pos, D): the model's rotary tables (row = position id, as transformers' rotary module
computes them, in the model's dtype), so any rope scaling the model uses comes with them. Per half of the head dim,
as transformers' `apply_rotary_pos_emb` with `rotate_half`: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
(computed in float32, rounded once).
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import torch

from specdec.kernels.tree_attention import _jit, tl, triton


@_jit
def _rope_cache_kernel(QKV, Positions, Slots, Cos, Sin, Keys, Values, stride_t, stride_rope,
                       stride_kh, stride_ks, stride_vh, stride_vs, num_q_heads, num_kv_heads,
                       HALF: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)  # [0, Hq): a query head, rotated in place; [Hq, Hq + Hkv): a kv head, to the cache
    position = tl.load(Positions + token)
    dims = tl.arange(0, BLOCK)
    ok = dims < HALF
    row = QKV + token * stride_t + head * 2 * HALF
    x1 = tl.load(row + dims, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + dims, mask=ok, other=0.0).to(tl.float32)
    table = position * stride_rope + dims
    cos1 = tl.load(Cos + table, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + table + HALF, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(Sin + table, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + table + HALF, mask=ok, other=0.0).to(tl.float32)
    y1 = (x1 * cos1 - x2 * sin1).to(QKV.dtype.element_ty)
    y2 = (x2 * cos2 + x1 * sin2).to(QKV.dtype.element_ty)
    if head < num_q_heads:
        tl.store(row + dims, y1, mask=ok)
        tl.store(row + HALF + dims, y2, mask=ok)
    else:
        kv_head = head - num_q_heads
        slot = tl.load(Slots + token)
        key = Keys + kv_head * stride_kh + slot * stride_ks
        tl.store(key + dims, y1, mask=ok)
        tl.store(key + HALF + dims, y2, mask=ok)
        value_row = QKV + token * stride_t + (num_q_heads + num_kv_heads + kv_head) * 2 * HALF
        value = Values + kv_head * stride_vh + slot * stride_vs
        tl.store(value + dims, tl.load(value_row + dims, mask=ok, other=0.0), mask=ok)
        tl.store(value + HALF + dims, tl.load(value_row + HALF + dims, mask=ok, other=0.0), mask=ok)


def rope_cache(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_q_heads: int) -> None:
    """See the module docstring. keys, values: (Hkv, S, D) with unit stride along D; positions, slots: (T,) int."""
    tokens = qkv.shape[0]
    num_kv_heads, _, head_dim = keys.shape
    if (qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2 or qkv.stride(1) != 1
            or keys.stride(2) != 1 or values.stride(2) != 1 or cos.shape != sin.shape or cos.shape[1] != head_dim):
        raise ValueError(f"expected qkv (T, (Hq + 2 Hkv) D) = (T, {(num_q_heads + 2 * num_kv_heads) * head_dim}), "
                         f"keys/values (Hkv, S, D) and cos/sin (S_pos, D) with an even D; got {tuple(qkv.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(cos.shape)}")
    half = head_dim // 2
    _rope_cache_kernel[(tokens, num_q_heads + num_kv_heads)](
        qkv, positions, slots, cos, sin, keys, values, qkv.stride(0), cos.stride(0),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), num_q_heads, num_kv_heads,
        HALF=half, BLOCK=max(16, triton.next_power_of_2(half)), num_warps=1)


def rope_cache_reference(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_q_heads: int) -> None:
    """Plain torch, the same in-place effect (float32 math, one rounding)."""
    num_kv_heads, _, head_dim = keys.shape
    heads = qkv.view(qkv.shape[0], -1, head_dim)
    rotated = heads[:, : num_q_heads + num_kv_heads].float()
    cos_rows, sin_rows = cos[positions].float()[:, None], sin[positions].float()[:, None]
    x1, x2 = rotated.chunk(2, dim=-1)
    turned = torch.cat([-x2, x1], dim=-1)
    rotated = (rotated * cos_rows + turned * sin_rows).to(qkv.dtype)
    heads[:, :num_q_heads] = rotated[:, :num_q_heads]
    keys[:, slots] = rotated[:, num_q_heads:].transpose(0, 1)
    values[:, slots] = heads[:, num_q_heads + num_kv_heads:].transpose(0, 1)
