"""KV compaction after tree verification: move the accepted path's K/V rows into place, all layers in one launch.

Layout: one static cache tensor `kv` of shape (L, 2, B, Hkv, S_max, D) (layer, key/value, batch, kv head, position,
head dim), any strides. `kv[l, 0]` and `kv[l, 1]` are the (B, Hkv, S_max, D) key and value buffers of layer l, the
layout transformers' attention functions and `StaticCache` layers use, so a static-cache backend allocates this one
tensor and hands out those views. Row `src_positions[j]` moves to `dst_start + j` in every layer, head and batch row.

Overlap. The verifier calls this with dst_start = root + 1 and src_positions[j] = root + 1 + accepted_nodes[j],
where accepted_nodes is one root-to-leaf path of a topologically ordered tree, so strictly increasing:
accepted_nodes[j] >= j, hence src[j] >= dst[j] = dst_start + j. Copying in increasing j is then safe: the write of
step j goes to dst[j], and every later read src[k] (k > j) satisfies src[k] >= dst[k] > dst[j], so it never reads a
row already overwritten. (Steps j may not run in parallel: src[j] = dst[j + 1] is allowed, e.g. path [1, 2].)
The kernel therefore gives each program its own (layer, k/v, batch, head) row slice and walks j in order, with a
barrier between steps. `kv_compact` checks the precondition src >= dst on request (`check=True`, one host sync).

    kv_compact(kv, torch.tensor([4, 6, 9]), dst_start=4)    # rows 4, 6, 9 -> 4, 5, 6 in every layer
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import torch

from specdec.kernels.tree_attention import _jit, interpret_mode, tl, triton


@_jit
def cache_slice(KV, slice_id, num_heads, batch, stride_l, stride_c, stride_b, stride_h):
    """Where one row slice of a (L, 2, B, Hkv, S_max, D) cache starts: slice_id = ((layer * 2 + k/v) * B + batch)
    * Hkv + head (a grid of L * 2 * B * Hkv programs, one slice each)."""
    head = slice_id % num_heads
    batch_row = (slice_id // num_heads) % batch
    kv_half = (slice_id // (num_heads * batch)) % 2
    layer = slice_id // (num_heads * batch * 2)
    return KV + layer * stride_l + kv_half * stride_c + batch_row * stride_b + head * stride_h


@_jit
def _kv_compact_kernel(KV, Src, dst_arg, num_rows, num_heads, batch, D,
                       stride_l, stride_c, stride_b, stride_h, stride_s, stride_d,
                       DST_IN_TENSOR: tl.constexpr, BLOCK_D: tl.constexpr):
    base = cache_slice(KV, tl.program_id(0), num_heads, batch, stride_l, stride_c, stride_b, stride_h)
    if DST_IN_TENSOR:
        dst_start = tl.load(dst_arg)
    else:
        dst_start = dst_arg
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    for j in range(num_rows):  # in order: see the module docstring
        src = tl.load(Src + j)
        row = tl.load(base + src * stride_s + dims * stride_d, mask=dim_ok)
        tl.store(base + (dst_start + j) * stride_s + dims * stride_d, row, mask=dim_ok)
        tl.debug_barrier()


def kv_compact(kv: torch.Tensor, src_positions: torch.Tensor, dst_start: int | torch.Tensor,
               check: bool = False) -> None:
    """In place: kv[..., dst_start + j, :] = kv[..., src_positions[j], :] for j = 0..M-1, in order.

    kv:            (L, 2, B, Hkv, S_max, D) static cache, any strides, any dtype
    src_positions: (M,) integer, on kv's device; M = 0 is a no-op
    dst_start:     int, or a 0-d integer tensor on kv's device (no host sync, CUDA graphs)
    Requires src_positions[j] >= dst_start + j (true for an accepted path; `check=True` verifies it)."""
    if kv.dim() != 6 or kv.shape[1] != 2:
        raise ValueError(f"kv must be (L, 2, B, Hkv, S_max, D), got {tuple(kv.shape)}")
    if src_positions.dim() != 1:
        raise ValueError(f"src_positions must be 1-D (M,), got {tuple(src_positions.shape)}")
    num_rows = src_positions.numel()
    if num_rows == 0:
        return
    if check:
        dst = dst_start + torch.arange(num_rows, device=src_positions.device)
        if not bool((src_positions >= dst).all()) or int(src_positions.max()) >= kv.shape[4]:
            raise ValueError(f"kv_compact needs dst_start + j <= src_positions[j] < S_max = {kv.shape[4]}, got "
                             f"dst_start {int(dst_start)} and src_positions {src_positions.tolist()}")
    layers, _, batch, num_heads, _, head_dim = kv.shape
    dst_in_tensor = isinstance(dst_start, torch.Tensor)
    _kv_compact_kernel[(layers * 2 * batch * num_heads,)](
        kv, src_positions, dst_start if dst_in_tensor else int(dst_start), num_rows, num_heads, batch, head_dim,
        *kv.stride(), DST_IN_TENSOR=dst_in_tensor, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=1 if interpret_mode() or head_dim <= 128 else 2)


def kv_compact_reference(kv: torch.Tensor, src_positions: torch.Tensor, dst_start: int | torch.Tensor) -> None:
    """Plain torch, in place: gather every source row first (advanced indexing copies), then write."""
    start = int(dst_start)
    kv[..., start: start + src_positions.numel(), :] = kv[..., src_positions, :]
