"""Token embedding lookup for a step's few tokens, in one launch.

`F.embedding` of 2-16 ids runs PyTorch's small-index `index_select` kernel, which walks the ids one after another:
6 us for 8 ids and 12 us for 16 on the H100 at the zoo target's width (768), against 2 us for one id
(`evals/scripts/profile_step_kernels.py`). Here each (id, column block) is its own program:

    hidden = embedding(tokens, table)      # tokens (T,) ints on the table's device -> (T, H) rows of table (V, H)
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import torch

from specdec.kernels.tree_attention import _jit, interpret_mode, tl, triton


@_jit
def _embedding_kernel(Ids, Table, Out, width, stride_t, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    token = tl.load(Ids + row).to(tl.int64)  # a row offset past 2^31 elements stays exact
    tl.store(Out + row * stride_o + cols, tl.load(Table + token * stride_t + cols, mask=ok), mask=ok)


def embedding(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """tokens (T,) integer ids (each in [0, V), not checked: the caller's ids are), table (V, H) with unit column
    stride -> (T, H), contiguous, in the table's dtype."""
    if tokens.dim() != 1 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"table must be (V, H) with unit column stride, got {tuple(table.shape)}")
    count, width = tokens.shape[0], table.shape[1]
    out = torch.empty(count, width, dtype=table.dtype, device=table.device)
    block = min(triton.next_power_of_2(width), 4096 if interpret_mode() else 1024)
    if count:
        _embedding_kernel[(count, triton.cdiv(width, block))](tokens, table, out, width, table.stride(0),
                                                              out.stride(0), BLOCK=block)
    return out


def embedding_reference(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(tokens, table)
