"""RMSNorm with the residual add fused in: the two norms of every transformer layer in one launch each.

    out = add_rmsnorm(hidden, weight, eps, delta)   # hidden += delta (in place, rounded to hidden's dtype), then
                                                    # out = weight * (hidden / sqrt(mean(hidden ** 2) + eps))

`hidden` (T, H) is the residual stream; `delta` (T, H) what the last block added to it (None: no add, the first
norm of the first layer). Rounding follows transformers' `LlamaRMSNorm`: the sum is rounded to the stream's dtype,
the normalisation runs in float32, its result is rounded to the dtype before the weight multiplies it.
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import torch

from specdec.kernels.tree_attention import _jit, tl, triton


@_jit
def _add_rmsnorm_kernel(Hidden, Delta, Weight, Out, stride_h, stride_d, stride_o, size, eps,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    x = tl.load(Hidden + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(Delta + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(Hidden.dtype.element_ty)
        tl.store(Hidden + row * stride_h + cols, x, mask=ok)
        x = x.to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, 0) / size + eps)
    weight = tl.load(Weight + cols, mask=ok, other=0.0).to(tl.float32)
    out = normed.to(Out.dtype.element_ty).to(tl.float32) * weight  # the product in float32: exact, then rounded
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=ok)


def add_rmsnorm(hidden: torch.Tensor, weight: torch.Tensor, eps: float,
                delta: torch.Tensor | None = None) -> torch.Tensor:
    """hidden (T, H), rows contiguous; weight (H,); delta (T, H) or None. Returns the normed (T, H) in hidden's dtype."""
    rows, size = hidden.shape
    if hidden.stride(1) != 1 or weight.shape != (size,) or (delta is not None and delta.shape != hidden.shape):
        raise ValueError(f"expected hidden (T, H) with unit column stride, weight (H,) and delta like hidden; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, "
                         f"{None if delta is None else tuple(delta.shape)}")
    out = torch.empty_like(hidden)
    source = hidden if delta is None else delta
    _add_rmsnorm_kernel[(rows,)](hidden, source, weight, out, hidden.stride(0), source.stride(0), out.stride(0),
                                 size, eps, HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(size),
                                 num_warps=4 if size <= 4096 else 8)
    return out


def add_rmsnorm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float,
                          delta: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch, transformers' LlamaRMSNorm after `hidden = hidden + delta` (in place)."""
    if delta is not None:
        hidden.add_(delta)
    x = hidden.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(hidden.dtype)
