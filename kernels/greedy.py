"""The work between two greedy decode steps chained on the device (`GraphBackend.greedy_decode`), in one launch.

A chained step is followed by its argmax, the copy of that id into the next step's input, and three counters moved
on by one (position, the prefix the next step sees, the slot it writes): five small launches of 1.5-3 us each in
the chain's graph, on a step of 0.4 ms (zoo target) to 1.1 ms (1.1B). Here one program reads the logits row and
does all of it:

    greedy_advance(logits, picks, index, tokens, positions, prefix, slots)   # picks[index] = argmax; then
    # tokens[0] = that id; positions[0], prefix, slots[0] += 1  (advance=False: the pick only)

The pick is the first maximum of the raw logits, as `torch.argmax` (and the reference decoder) takes it; a NaN
logit is never picked (torch's argmax would pick it; a NaN step is broken either way).
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import torch

from specdec.kernels.tree_attention import _jit, interpret_mode, kernel_available, tl, triton


@_jit
def _greedy_advance_kernel(Logits, vocab, Picks, index, Tokens, Positions, Prefix, Slots,
                           ADVANCE: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)  # each lane's maximum so far and its (first) index
    best_at = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        ids = start + cols
        x = tl.load(Logits + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32)
        better = x > best  # strict: a lane meets its ids in order, so the first of equal values stays
        best = tl.where(better, x, best)
        best_at = tl.where(better, ids, best_at)
    top = tl.max(best, 0)
    pick = tl.min(tl.where(best == top, best_at, vocab), 0)  # the first index holding the maximum
    pick = tl.where(pick == vocab, 0, pick).to(tl.int64)  # every logit -inf: id 0, as torch.argmax
    tl.store(Picks + index, pick)
    if ADVANCE:
        tl.store(Tokens, pick.to(Tokens.dtype.element_ty))
        tl.store(Positions, tl.load(Positions) + 1)
        tl.store(Prefix, tl.load(Prefix) + 1)
        tl.store(Slots, tl.load(Slots) + 1)


def greedy_advance(logits: torch.Tensor, picks: torch.Tensor, index: int, tokens: torch.Tensor,
                   positions: torch.Tensor, prefix: torch.Tensor, slots: torch.Tensor, advance: bool = True) -> None:
    """logits (V,) contiguous; picks (count,) int64; tokens, positions, slots (>= 1,) and prefix (0-d), int64 on
    the logits' device. picks[index] = the first argmax of `logits`; with `advance`, tokens[0] = it and
    positions[0], prefix, slots[0] each + 1. Without Triton (or off CUDA outside the interpreter): torch ops."""
    if logits.dim() != 1 or not logits.is_contiguous():
        raise ValueError(f"logits must be one contiguous (V,) row, got {tuple(logits.shape)}")
    if not kernel_available(logits.device):
        picks[index] = logits.argmax()
        if advance:
            tokens[0] = picks[index]
            for counter in (positions[:1], prefix, slots[:1]):
                counter.add_(1)
        return
    vocab = logits.shape[0]
    block = min(triton.next_power_of_2(vocab), 32768)
    _greedy_advance_kernel[(1,)](logits, vocab, picks, index, tokens, positions, prefix, slots, ADVANCE=advance,
                                 BLOCK=block, num_warps=1 if interpret_mode() else max(4, block // 1024))
