"""Draft token trees.

Terms (used across specdec):
- **root**: the last committed token. Its KV is not in the target's cache yet; the verifier feeds it together with the
  tree, and the target's distribution at the root scores the tree's first level.
- **node i**: a drafted token `tokens[i]` whose parent is node `parents[i]` (-1 = the root). Nodes are topologically
  ordered: `parents[i] < i`.
- **depth**: the root has depth 0, its children depth 1, and so on. A node's position id is `root_position + depth`.
- **chain**: a tree with branching 1 (node i's parent is i - 1). The **empty tree** is a plain autoregressive step.

Worked example: the drafts "a b c" and "a d" share the prefix "a":

    tokens  = [a, b, c, d]
    parents = [-1, 0, 1, 0]      depths = [1, 2, 3, 2]      paths = [[0, 1, 2], [0, 3]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy
import torch


@dataclass(frozen=True)
class DraftTree:
    """A tree of drafted tokens below the root (the last committed token).

    tokens:      (N,) int64   drafted token ids
    parents:     (N,) int64   parent node index, -1 for a child of the root; parents[i] < i
    draft_probs: (N, V) float or None
                 row i = the distribution q the drafter sampled node i from (at node i's parent). None means every
                 node is a deterministic draft: q is one-hot on tokens[i].
    source:      N names or None: which drafter proposed each node (fused trees, per-source statistics).
    host_parents: `parents` as a tuple on the host, so the structure functions below never read the device (a
                 GPU sync per call). Filled from `parents` at construction; `.to()` carries it over.
    host_tokens: `tokens` as a tuple on the host where that costs no device read: filled at construction when
                 `tokens` is on the CPU (else None, unless given); `.to()` carries it over.
    origin:      for a tree cut from a drafter's proposal (`subtree`): node i was node origin[i] there; else None.
    match_len:   for a drafter that copies from the context (`ngram`, `copyspec`): how many of the context's last
                 tokens the tokens before its first path's earlier occurrence equal (`match_length`; a longer match
                 is likelier to continue); 0: none given.
                 Controllers learn acceptance per match length.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None
    source: tuple[str, ...] | None = None
    host_parents: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    host_tokens: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    origin: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    match_len: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        tokens, parents = self.tokens, self.parents
        if tokens.dim() != 1 or parents.shape != tokens.shape:
            raise ValueError(f"tokens and parents must be 1-D of one length, got {tuple(tokens.shape)} "
                             f"and {tuple(parents.shape)}")
        if tokens.dtype != torch.long or parents.dtype != torch.long:
            raise TypeError(f"tokens and parents must be int64, got {tokens.dtype} and {parents.dtype}")
        n = tokens.numel()
        if self.host_parents is None:
            object.__setattr__(self, "host_parents", tuple(parents.tolist()))
        elif parents.device.type == "cpu" and tuple(parents.tolist()) != tuple(self.host_parents):
            raise ValueError("host_parents must equal parents; leave it unset and it is filled in")
        if self.host_tokens is None:
            if tokens.device.type == "cpu":
                object.__setattr__(self, "host_tokens", tuple(tokens.tolist()))
        elif tokens.device.type == "cpu" and tuple(tokens.tolist()) != tuple(self.host_tokens):
            raise ValueError("host_tokens must equal tokens; leave it unset and it is filled in")
        if not all(-1 <= parent < node for node, parent in enumerate(self.host_parents)):
            raise ValueError(f"parents must satisfy -1 <= parents[i] < i (topological order), "
                             f"got {list(self.host_parents)}")
        if self.draft_probs is not None and (self.draft_probs.dim() != 2 or self.draft_probs.shape[0] != n):
            raise ValueError(f"draft_probs must be (N, V) with N={n}, got {tuple(self.draft_probs.shape)}")
        if self.source is not None and len(self.source) != n:
            raise ValueError(f"source must name {n} nodes, got {len(self.source)}")

    def __len__(self) -> int:
        return len(self.host_parents)

    @classmethod
    def _built(cls, tokens: Sequence[int], parents: Sequence[int], source: tuple[str, ...] | None = None,
               origin: tuple[int, ...] | None = None, match_len: int = 0) -> DraftTree:
        """A deterministic host tree from lists this module built in topological order (`from_paths`, `subtree`):
        the checks of `__post_init__` hold by construction and are skipped (a batch of 64 rows builds two trees a
        row a step; the checks were half of each tree's host time)."""
        tree = object.__new__(cls)
        for name, value in (("tokens", _long_tensor(tokens)), ("parents", _long_tensor(parents)),
                            ("draft_probs", None), ("source", source), ("host_parents", tuple(parents)),
                            ("host_tokens", tuple(tokens)), ("origin", origin), ("match_len", match_len)):
            object.__setattr__(tree, name, value)
        return tree

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> DraftTree:
        """The tree with no nodes: the verifier then does a plain autoregressive step."""
        none = torch.empty(0, dtype=torch.long, device=device)
        return cls(tokens=none, parents=none.clone(), host_parents=(), host_tokens=())

    @classmethod
    def chain(cls, tokens: Sequence[int] | torch.Tensor, draft_probs: torch.Tensor | None = None,
              source: str | None = None) -> DraftTree:
        """A single draft sequence: node i is the child of node i - 1."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        parents = torch.arange(tokens.numel(), dtype=torch.long, device=tokens.device) - 1
        names = None if source is None else (source,) * tokens.numel()
        return cls(tokens=tokens, parents=parents, draft_probs=draft_probs, source=names)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], source: str | None = None,
                   max_nodes: int | None = None, match_len: int = 0) -> DraftTree:
        """A deterministic tree (a trie) from token sequences; shared prefixes become shared nodes.

        Paths are inserted in order, so put the most promising first: with `max_nodes`, insertion stops at the
        budget (a path may be cut part-way; its prefix stays)."""
        tokens: list[int] = []
        parents: list[int] = []
        child_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for path in paths:
            parent = -1
            for token in path:
                node = child_of.get((parent, int(token)))
                if node is None:
                    if max_nodes is not None and len(tokens) >= max_nodes:
                        break
                    node = len(tokens)
                    child_of[(parent, int(token))] = node
                    tokens.append(int(token))
                    parents.append(parent)
                parent = node
        names = None if source is None else (source,) * len(tokens)
        return cls._built(tokens, parents, names, match_len=match_len)

    def to(self, device: torch.device | str) -> DraftTree:
        tokens, parents = self.tokens.to(device), self.parents.to(device)
        probs = None if self.draft_probs is None else self.draft_probs.to(device)
        if tokens is self.tokens and parents is self.parents and probs is self.draft_probs:
            return self  # already there (like `Tensor.to`); a frozen tree is safe to share
        return DraftTree(tokens, parents, probs, self.source, self.host_parents, self.host_tokens, self.origin,
                         self.match_len)


def subtree(tree: DraftTree, keep: Sequence[int]) -> DraftTree:
    """The nodes `keep` of `tree` (every kept node's parent kept too), renumbered in their order there; `origin`
    maps each back. The tokens stay where they were (a host index, one copy to the device where they are not)."""
    keep = sorted(keep)
    if len(keep) == len(tree):
        return tree
    new_index = {old: new for new, old in enumerate(keep)}
    old_parents = tree.host_parents
    try:
        parents = [-1 if old_parents[old] < 0 else new_index[old_parents[old]] for old in keep]
    except KeyError:
        raise ValueError(f"keep {keep} drops the parent of a kept node") from None
    host_tokens = None if tree.host_tokens is None else tuple(tree.host_tokens[old] for old in keep)
    source = None if tree.source is None else tuple(tree.source[old] for old in keep)
    origin = tuple(keep) if tree.origin is None else tuple(tree.origin[old] for old in keep)
    on_host = tree.tokens.device.type == "cpu" and tree.parents.device.type == "cpu"
    if host_tokens is not None and on_host and tree.draft_probs is None:
        return DraftTree._built(host_tokens, parents, source, origin, tree.match_len)
    if host_tokens is not None and tree.tokens.device.type == "cpu":
        tokens = _long_tensor(list(host_tokens))
    else:
        tokens = tree.tokens[torch.tensor(keep, dtype=torch.long).to(tree.tokens.device)]
    probs = None if tree.draft_probs is None else tree.draft_probs[torch.tensor(keep).to(tree.draft_probs.device)]
    return DraftTree(tokens, _long_tensor(parents).to(tree.parents.device), probs, source, tuple(parents),
                     host_tokens, origin, tree.match_len)


def _long_tensor(values: list[int]) -> torch.Tensor:
    """(len(values),) int64 on the CPU; through numpy, a third of `torch.tensor`'s host time on a short list."""
    return torch.from_numpy(numpy.array(values, dtype=numpy.int64))


def depth_list(tree: DraftTree) -> list[int]:
    """Depth of each node (children of the root have depth 1), computed on the host."""
    out: list[int] = []
    for parent in tree.host_parents:
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def depths(tree: DraftTree) -> torch.Tensor:
    """(N,) int64 on the tree's device: depth of each node (children of the root have depth 1)."""
    return torch.tensor(depth_list(tree), dtype=torch.long, device=tree.tokens.device)


def max_depth(tree: DraftTree) -> int:
    """Length of the tree's longest root-to-leaf path (0 for the empty tree)."""
    return max(depth_list(tree), default=0)


def ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """(N, N) bool on the tree's device: mask[i, j] is True iff node j is node i or one of its ancestors (root
    excluded). This is the tree-attention pattern: row i may attend to exactly the nodes set in it.

    Built on the host from `host_parents` and copied once: no per-node device ops."""
    return host_ancestor_mask(tree).to(tree.tokens.device)


def host_ancestor_mask(tree: DraftTree, with_root: bool = False) -> torch.Tensor:
    """`ancestor_mask` on the host (CPU), whatever the tree's device. with_root: (N + 1, N + 1) with the root as row
    and column 0 (every row sees the root, the root only itself): the block mask of a verification step."""
    first = int(with_root)  # the column of node 0
    size = len(tree) + first
    if size == 0:
        return torch.zeros(0, 0, dtype=torch.bool)
    # row of node i = its parent's row plus itself: one C-level copy per node (a 255-node chain in ~0.1 ms, where
    # indexing with Python lists took ~13 ms). rows[0] is the root's, rows[1 + i] node i's.
    rows = [bytearray(size)]
    rows[0][0] = first
    for node, parent in enumerate(tree.host_parents):
        row = bytearray(rows[parent + 1])
        row[first + node] = 1
        rows.append(row)
    return torch.frombuffer(bytearray().join(rows[1 - first:]), dtype=torch.bool).view(size, size)


def position_ids(tree: DraftTree, root_position: int) -> torch.Tensor:
    """(N,) int64 position ids of the nodes: root_position + depth."""
    return depths(tree) + root_position


def paths(tree: DraftTree) -> list[list[int]]:
    """Root-to-leaf paths as lists of node indices, in leaf order."""
    parents = tree.host_parents
    has_child = [False] * len(parents)
    for parent in parents:
        if parent >= 0:
            has_child[parent] = True
    out = []
    for leaf, leafy in enumerate(has_child):
        if leafy:
            continue
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        out.append(path[::-1])
    return out


def path_to(tree: DraftTree, node: int) -> list[int]:
    """Node indices from the root's child down to `node` (empty for node -1, the root)."""
    return parent_path(tree.host_parents, node)


def parent_path(parents: Sequence[int], node: int) -> list[int]:
    """`path_to` in a tree given by its parent indices (-1 = the root)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
