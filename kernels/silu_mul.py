"""The SwiGLU gate: out = silu(gate) * up from one fused gate-and-up projection, in one launch.

    out = silu_mul(gate_up)     # gate_up (T, 2I) = [gate | up] -> (T, I)

Rounding follows transformers' `LlamaMLP`: silu(gate) is rounded to the dtype, then multiplied by `up` and rounded.
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import torch

from specdec.kernels.tree_attention import _jit, interpret_mode, tl, triton


@_jit
def _silu_mul_kernel(GateUp, Out, stride_g, stride_o, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(GateUp + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_g + width + cols, mask=ok, other=0.0).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (activated * up).to(Out.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I), unit column stride -> (T, I) in its dtype."""
    rows, double = gate_up.shape
    if double % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"expected gate_up (T, 2I) with unit column stride, got {tuple(gate_up.shape)}")
    width = double // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 4096 if interpret_mode() else 1024
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), out.stride(0), width,
                                                         BLOCK=block)
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
