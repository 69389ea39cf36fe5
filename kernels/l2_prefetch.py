"""Read weights into the GPU's L2 cache ahead of the product that needs them, beside a kernel that leaves HBM idle.

At batch 1 a step's tree attention reads little (a 1.1B layer's KV at 2k keys: 2 MB) and is bound by latency: HBM
sits mostly idle for its ~7 us, and in the gaps between launches. The native forward launches this kernel on a side
stream beside the attention (a branch of the step's CUDA graph) to pull the next products' weights (the o projection
and the first rows of gate/up) into L2, so those GEMVs then read part of their weights from L2 instead of HBM.

    l2_prefetch([layer.out, gate_rows, up_rows], sink)      # every region: a contiguous tensor; sink: (programs,) int32

Each program XORs the 32-bit words of its chunk of the regions (loads marked evict_last) and stores the result in
`sink` (a value the compiler cannot drop, so the loads stay; nothing reads it but the tests).
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import numpy
import torch

from specdec.kernels.tree_attention import _jit, interpret_mode, tl, triton

PROGRAMS, BLOCK, NUM_WARPS = 64, 8192, 8  # per region; BLOCK words a load per program


@_jit
def _prefetch_kernel(Words, total, chunk, Sink, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    start = program * chunk
    end = tl.minimum(start + chunk, total)
    acc = tl.zeros((BLOCK,), tl.int32)
    for offset in range(start, end, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        acc ^= tl.load(Words + index, mask=index < end, other=0, eviction_policy="evict_last")
    tl.store(Sink + program, tl.xor_sum(acc, 0))


def words(region: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as 32-bit words (a view)."""
    if not region.is_contiguous() or region.numel() * region.element_size() % 4:
        raise ValueError(f"a prefetch region must be contiguous and a whole number of 32-bit words, got "
                         f"{tuple(region.shape)} {region.dtype} with strides {region.stride()}")
    return region.reshape(-1).view(torch.int32)


def l2_prefetch(regions: list[torch.Tensor], sink: torch.Tensor, programs: int = PROGRAMS, block: int = BLOCK,
                num_warps: int = NUM_WARPS) -> None:
    """Load every region once (into L2 on a GPU); program p of region r writes its XOR of words to sink[r, p]."""
    if sink.dtype != torch.int32 or sink.shape != (len(regions), programs):
        raise ValueError(f"sink must be ({len(regions)}, {programs}) int32, got {tuple(sink.shape)} {sink.dtype}")
    block = 1024 if interpret_mode() else block
    for region, out in zip(regions, sink):
        flat = words(region)
        chunk = triton.cdiv(flat.numel(), programs)
        _prefetch_kernel[(programs,)](flat, flat.numel(), chunk, out, BLOCK=block, num_warps=num_warps)


def l2_prefetch_reference(regions: list[torch.Tensor], programs: int = PROGRAMS) -> torch.Tensor:
    """What `l2_prefetch` writes to its sink: each program's XOR over its chunk of each region's words."""
    rows = []
    for region in regions:
        flat = words(region).cpu().numpy()
        chunk = -(-len(flat) // programs)
        rows.append([numpy.bitwise_xor.reduce(flat[p * chunk: (p + 1) * chunk], initial=numpy.int32(0))
                     for p in range(programs)])
    return torch.tensor(numpy.array(rows, dtype=numpy.int32))
