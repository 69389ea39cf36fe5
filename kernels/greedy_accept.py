"""Greedy tree acceptance and KV compaction on the device, in one launch after the verify step.

What `verify` otherwise does on the host at temperature 0 -- read every row's argmax, walk the tree (`greedy_walk`),
then launch a copy of the accepted rows' KV -- costs a device read, a host-to-device copy of the row indices and a
few launches per step. Here the step's argmax ids stay on the device and every program of the grid walks the tree
itself (a few scalar steps: one per accepted node), moving its own slice of the cache as it goes; program 0 also
writes the outcome for the host's one read.

Terms (as `specdec.accept`): row 0 is the root, row 1 + i is node i; `best[r]` is the target's argmax at row r; a
row accepts its lowest-index child whose token is `best[r]`; the bonus is `best` at the deepest accepted row.

    greedy_accept(best, tokens, parent_rows, prefix, kv, result)
    # best (S,) argmax ids; tokens (S,) [root, node tokens, padding]; parent_rows (S,): node i's parent row at i
    # (-1 for padding); prefix: 0-d, the root's cache slot; kv (L, 2, B, Hkv, S_max, D) static cache
    # result (2 + 2 (S - 1),) int64: [accepted_len, bonus, accepted nodes..., their tokens...]

Compaction: node i's KV sits at slot prefix + 1 + i; the j-th accepted node moves to prefix + 1 + j. Sources are
strictly increasing and never below their targets (a root-to-leaf path of a topologically ordered tree), so moving
them in path order never reads a row already overwritten (`specdec.kernels.kv_compact`'s argument).
"""

from __future__ import annotations  # annotations stay strings: `tl.constexpr` parses without Triton installed

import torch

from specdec.accept import greedy_walk
from specdec.tree import parent_path
from specdec.kernels.kv_compact import cache_slice, kv_compact_reference
from specdec.kernels.tree_attention import _jit, interpret_mode, kernel_available, tl, triton


@_jit
def _greedy_accept_kernel(Best, Tokens, ParentRows, Prefix, KV, Result, num_nodes, num_heads, batch, D,
                          stride_l, stride_c, stride_b, stride_h, stride_s, stride_d,
                          BLOCK_NODES: tl.constexpr, BLOCK_D: tl.constexpr):
    base = cache_slice(KV, tl.program_id(0), num_heads, batch, stride_l, stride_c, stride_b, stride_h)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    writer = tl.program_id(0) == 0  # one program writes the outcome

    nodes = tl.arange(0, BLOCK_NODES)
    node_ok = nodes < num_nodes
    parent_row = tl.load(ParentRows + nodes, mask=node_ok, other=-1)
    token = tl.load(Tokens + 1 + nodes, mask=node_ok, other=-1)
    parent_best = tl.load(Best + parent_row, mask=node_ok & (parent_row >= 0), other=-1)
    passing = node_ok & (parent_row >= 0) & (token == parent_best)
    root_slot = tl.load(Prefix)

    row = 0  # the deepest accepted row so far
    depth = 0
    searching = True
    while searching:
        child = tl.min(tl.where(passing & (parent_row == row), nodes, BLOCK_NODES), 0)
        searching = child < BLOCK_NODES
        if searching:
            source = root_slot + 1 + child
            target = root_slot + 1 + depth
            if source != target:
                kv_row = tl.load(base + source * stride_s + dims * stride_d, mask=dim_ok)
                tl.store(base + target * stride_s + dims * stride_d, kv_row, mask=dim_ok)
            if writer:
                tl.store(Result + 2 + depth, child.to(tl.int64))
                tl.store(Result + 2 + num_nodes + depth, tl.load(Tokens + 1 + child).to(tl.int64))
            row = child + 1
            depth += 1
    if writer:
        tl.store(Result, depth.to(tl.int64))
        tl.store(Result + 1, tl.load(Best + row).to(tl.int64))


def greedy_accept(best: torch.Tensor, tokens: torch.Tensor, parent_rows: torch.Tensor, prefix: torch.Tensor,
                  kv: torch.Tensor, result: torch.Tensor) -> None:
    """In place: accept greedily, compact `kv`, write `result` (module docstring). All on kv's device, int64 ids;
    nothing read back, so it can be captured in a CUDA graph. Without Triton (or off CUDA outside the
    interpreter): `greedy_accept_reference`."""
    size = tokens.numel()
    if not (best.numel() == parent_rows.numel() == size and result.numel() == 2 * size):
        raise ValueError(f"best, tokens, parent_rows must be (S,) and result (2 S,), got {best.numel()}, {size}, "
                         f"{parent_rows.numel()}, {result.numel()}")
    if kv.dim() != 6 or kv.shape[1] != 2:
        raise ValueError(f"kv must be (L, 2, B, Hkv, S_max, D), got {tuple(kv.shape)}")
    if not kernel_available(kv.device):
        greedy_accept_reference(best, tokens, parent_rows, prefix, kv, result)
        return
    layers, _, batch, num_heads, _, head_dim = kv.shape
    _greedy_accept_kernel[(layers * 2 * batch * num_heads,)](
        best, tokens, parent_rows, prefix, kv, result, size - 1, num_heads, batch, head_dim, *kv.stride(),
        BLOCK_NODES=max(16, triton.next_power_of_2(size)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=1 if interpret_mode() or head_dim <= 128 else 2)


def greedy_accept_reference(best: torch.Tensor, tokens: torch.Tensor, parent_rows: torch.Tensor,
                            prefix: torch.Tensor, kv: torch.Tensor, result: torch.Tensor) -> None:
    """The host path (reads the ids back): `greedy_walk` over the tree's nodes (padding rows, parent -1, follow
    them), then `kv_compact_reference` -- the same outcome, compaction and `result`."""
    best_ids, token_ids, parents = best.tolist(), tokens.tolist(), parent_rows.tolist()
    num_nodes = len(token_ids) - 1
    count = next((node for node in range(num_nodes) if parents[node] < 0), num_nodes)
    node_parents = [row - 1 for row in parents[:count]]
    deepest, bonus = greedy_walk(node_parents, token_ids[1: 1 + count], best_ids)
    path = parent_path(node_parents, deepest)
    root_slot = int(prefix)
    source = torch.tensor([root_slot + 1 + node for node in path], dtype=torch.long, device=kv.device)
    kv_compact_reference(kv, source, root_slot + 1)
    outcome = [len(path), bonus] + path + [0] * (num_nodes - len(path))
    outcome += [token_ids[1 + node] for node in path] + [0] * (num_nodes - len(path))
    result.copy_(torch.tensor(outcome, dtype=result.dtype))
