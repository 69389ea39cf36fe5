"""Lossless acceptance of a draft token tree against the target's logits (pure tensor functions).

Terms (N = tree nodes, V = vocab; row 0 is the root, row 1 + i is node i, so "row" always means one of N + 1):
- **draft**: the tree's tokens, (N,) int64. Node i was drawn by the drafter from `draft_probs[i]` = q_i, (V,), a
  distribution at node i's parent; `draft_probs is None` means deterministic drafts (q_i is one-hot on tokens[i]).
- **target probabilities** p: (N + 1, V) float32, `target_probs(logits, params)`, the same processing as the
  reference decoder; row r is the target's next-token distribution after the path root -> row r.
- **accepted**: a node whose token the target keeps, and whose ancestors are all accepted. The accepted nodes form
  one path from the root; `accepted_len` is its length, `deepest_node` its last node (-1 = empty path).
- **residual** r: (N + 1, V), what the target still has to say at a row after the children tried there were
  rejected. It starts as p; rejecting a child drawn from q turns it into normalize(max(r - q, 0)).
- **bonus**: the token the target itself picks at the deepest accepted node (the root if none): the argmax of the
  raw logits when greedy, else a sample from that row's residual. The step commits path tokens + bonus.

Greedy (temperature 0): a child passes iff its token is the argmax of the raw logits at its parent (torch.argmax:
the first maximum); a row accepts its lowest-index passing child.

Sampling (temperature > 0) is recursive rejection sampling over siblings (SpecInfer / EAGLE): at a reached row, its
children are tried in node-index order; child x with draft q is accepted with probability min(1, r(x) / q(x)),
else r <- normalize(max(r - q, 0)) and the next sibling is tried; if all are rejected the bonus is drawn from r.
Each try outputs exactly r's distribution, so the committed tokens follow the target for any per-node q (sampled,
deterministic, or siblings drawn without replacement).

Every row runs its sibling tries at once, one sibling rank at a time. Which rows have a child at which rank is tree
structure: `tree.parents` is read on the host (here and in `ancestor_mask`), a device sync when the tree lives on
an accelerator. Nothing computed from the logits is read back: the results stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.sampling import SamplingParams, target_probs
from specdec.tree import DraftTree, ancestor_mask

# A rejection whose leftover mass max(r - q, 0).sum() is below this had probability ~0 (float32 rounding of r == q);
# normalising it would amplify rounding noise, so that row keeps its previous residual.
_MIN_RESIDUAL_MASS = 1e-6


@dataclass(frozen=True)
class Acceptance:
    """0-d int64 tensors on the logits' device, so reading them is the step's one host sync."""

    deepest_node: torch.Tensor  # index of the deepest accepted node, -1 = none accepted (only the bonus is committed)
    accepted_len: torch.Tensor  # number of accepted draft tokens = depth of deepest_node (0 if -1)
    bonus_token: torch.Tensor   # the target's own token at deepest_node (argmax, or sampled from the residual)


def accept(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> Acceptance:
    """Accept the longest path of `tree` the target agrees with, and pick the bonus token after it.

    logits: (N + 1, V) raw target logits, row 0 at the root, row 1 + i at node i. `generator` drives every random
    draw (temperature > 0); greedy acceptance uses none."""
    _check_inputs(tree, logits)
    if params.greedy:
        passes = tree.tokens == logits.argmax(-1)[_parent_rows(tree)]
        deepest_row, accepted_len = _deepest_accepted_row(tree, passes)
        bonus = logits.index_select(0, deepest_row.reshape(1)).argmax(-1)
    else:
        passes, residual = _sibling_rejection_sampling(tree, target_probs(logits, params), generator)
        deepest_row, accepted_len = _deepest_accepted_row(tree, passes)
        bonus = torch.multinomial(residual.index_select(0, deepest_row.reshape(1)), 1, generator=generator)
    return Acceptance(deepest_node=deepest_row - 1, accepted_len=accepted_len, bonus_token=bonus.reshape(()))


def greedy_walk(parents: Sequence[int], tokens: Sequence[int], best: Sequence[int]) -> tuple[int, int]:
    """Greedy acceptance on the host, the same outcome as `accept` with greedy params: (deepest node, -1 = none;
    bonus token). parents, tokens: the tree's (N,); best: the target's argmax at each of the N + 1 rows. From the
    root, each row accepts its lowest-index child whose token is the row's argmax, until a row accepts none.
    One read of `best` instead of ~15 small device ops: the greedy path of `verify` (host time is the bottleneck of
    a fast backend's step)."""
    children: dict[int, list[int]] = {}  # row -> its children, in node order
    for node, parent in enumerate(parents):
        children.setdefault(parent + 1, []).append(node)
    row = 0
    while True:
        passing = next((node for node in children.get(row, ()) if tokens[node] == best[row]), None)
        if passing is None:
            return row - 1, best[row]
        row = passing + 1


def _check_inputs(tree: DraftTree, logits: torch.Tensor) -> None:
    n = len(tree)
    if logits.dim() != 2 or logits.shape[0] != n + 1:
        raise ValueError(f"logits must be (N + 1, V) = ({n + 1}, V) for a tree of {n} nodes (row 0 = the root), "
                         f"got {tuple(logits.shape)}")
    tensors = [tree.tokens, tree.parents] + ([] if tree.draft_probs is None else [tree.draft_probs])
    devices = {t.device for t in tensors}
    if devices != {logits.device}:
        raise ValueError(f"tree is on {sorted(map(str, devices))} but logits are on {logits.device}; "
                         f"pass tree.to(logits.device)")
    if tree.draft_probs is not None and tree.draft_probs.shape[1] != logits.shape[1]:
        raise ValueError(f"draft_probs vocab {tree.draft_probs.shape[1]} != target vocab {logits.shape[1]}; "
                         f"the drafter must share the target's tokenizer")


def _parent_rows(tree: DraftTree) -> torch.Tensor:
    """(N,) int64: the row of each node's parent (0 = the root)."""
    return tree.parents + 1


def _children_by_rank(tree: DraftTree) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sibling rank s: (rows that have an s-th child, that child's node index), both (M_s,) int64.

    Worked example: parents = [-1, -1, 0, -1] -> rank 0: rows [0, 1], children [0, 2]; rank 1: rows [0], children [1];
    rank 2: rows [0], children [3]. Every node appears at exactly one rank."""
    ranks: list[tuple[list[int], list[int]]] = []
    child_count: dict[int, int] = {}
    for node, parent in enumerate(tree.host_parents):
        rank = child_count.get(parent + 1, 0)
        child_count[parent + 1] = rank + 1
        if rank == len(ranks):
            ranks.append(([], []))
        ranks[rank][0].append(parent + 1)
        ranks[rank][1].append(node)
    device = tree.parents.device
    return [(torch.tensor(rows, device=device), torch.tensor(children, device=device)) for rows, children in ranks]


def _sibling_rejection_sampling(tree: DraftTree, probs: torch.Tensor,
                                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling at every row at once, one sibling rank at a time.

    probs: (N + 1, V) float32 target probabilities. Returns
    - passes (N,) bool: node i would be accepted if its parent row tried it, i.e. if its earlier siblings were
      all rejected (the row then accepts its first passing child);
    - residual (N + 1, V): each row's residual after rejecting all of its children; p for a row without children.
      Only rows without a passing child ever use theirs (the bonus row is one)."""
    residual = probs.clone()
    passes = torch.zeros(len(tree), dtype=torch.bool, device=probs.device)
    # node x is accepted with probability min(1, r(x) / q(x)): iff u * q(x) < r(x) for a uniform u in [0, 1)
    thresholds = torch.rand(len(tree), generator=generator, device=probs.device) * _draft_prob_of_own_token(tree)
    for rows, children in _children_by_rank(tree):
        row_residual = residual[rows]
        passes[children] = thresholds[children] < row_residual.gather(1, tree.tokens[children, None])[:, 0]
        residual[rows] = _residual_after_rejection(row_residual, tree, children)
    return passes, residual


def _draft_prob_of_own_token(tree: DraftTree) -> torch.Tensor:
    """(N,) float32: q_i(tokens[i]), the probability the drafter gave each node's token (1 for deterministic drafts)."""
    if tree.draft_probs is None:
        return torch.ones(len(tree), device=tree.tokens.device)
    return tree.draft_probs.gather(1, tree.tokens[:, None])[:, 0].float()


def _residual_after_rejection(row_residual: torch.Tensor, tree: DraftTree, children: torch.Tensor) -> torch.Tensor:
    """(M, V) normalize(max(r - q, 0)) after rejecting `children` (M,), drawn from q, at rows whose residual is r.

    A row whose leftover mass is ~0 keeps r (see _MIN_RESIDUAL_MASS)."""
    if tree.draft_probs is None:  # q one-hot: r - q clamped at 0 just zeroes the rejected token
        leftover = row_residual.scatter(1, tree.tokens[children, None], 0.0)
    else:
        leftover = (row_residual - tree.draft_probs[children].float()).clamp_min(0.0)
    mass = leftover.sum(-1, keepdim=True)
    return torch.where(mass > _MIN_RESIDUAL_MASS, leftover / mass, row_residual)


def _deepest_accepted_row(tree: DraftTree, passes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row of the deepest accepted node (0 = the root: none accepted) and its depth, 0-d int64 each.

    passes: (N,) bool, whether each node passes its test. A row accepts its lowest-index passing child; a node is
    accepted iff it and each of its ancestors is the child its parent row accepts."""
    n = len(tree)
    parent_rows, node_ids = _parent_rows(tree), torch.arange(n, device=passes.device)
    first_passing = torch.full((n + 1,), n, dtype=torch.long, device=passes.device)  # n = none passes
    first_passing = first_passing.scatter_reduce(0, parent_rows, torch.where(passes, node_ids, n), reduce="amin")
    chosen = first_passing[parent_rows] == node_ids
    ancestors = ancestor_mask(tree)  # (N, N), node itself included
    accepted = ~(ancestors & ~chosen).any(1)
    depth = ancestors.sum(1)
    zero = torch.zeros(1, dtype=torch.long, device=passes.device)
    accepted_depth = torch.cat([zero, torch.where(accepted, depth, 0)])  # per row; accepted nodes lie on one path
    accepted_len, deepest_row = accepted_depth.max(0)
    return deepest_row, accepted_len
