"""`recycling`: Token Recycling (Luo et al., 2024) — the target's discarded top-k candidates become the next drafts.

State: an adjacency matrix `successors` (V, k) int32 on the CPU; row v holds the target's k most likely next tokens
the last time it scored a position holding token v (-1 = unknown). Every verification refreshes the rows of the
root and of every tree node, accepted or not, from the (N+1, V) logits the verifier computed anyway: no extra
forward. `propose` walks a static tree template from the root token: the template path (0, 2) means "the rank-2
successor of the rank-0 successor of the root". Rows the target never scored are seeded from the context (the
tokens that followed v there, most recent first); an unknown row has no children.

Memory: V * k * 4 bytes (+ V bytes of flags): 32000 * 8 * 4 = 1.0 MB for Llama-2's vocabulary, 151936 * 8 * 4 =
4.9 MB for Qwen2's. The matrix outlives `reset()` on purpose — what the target said after token v holds in any
sequence — and is rebuilt only for a target of another vocabulary size; `clear()` forgets it.

Example (k=2): successors[5] = [7, 9], successors[7] = [3, 8]; root token 5 and template [(0,), (1,), (0, 0)]
give tokens [7, 9, 3], parents [-1, -1, 0].
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from specdec.drafters.base import DraftContext, register_drafter
from specdec.tree import DraftTree

Template = list[tuple[int, ...]]  # paths of child ranks; every path's prefixes come before it


@dataclass(frozen=True)
class TemplateShape:
    """A static tree: the `nodes` most likely rank paths (ranks < max_width, at most `depth` deep), scoring a path as
    the product of per-edge acceptance rates top1 * rank_decay**rank (Medusa / Sequoia-style static trees)."""

    nodes: int
    max_width: int
    depth: int
    top1: float = 0.6
    rank_decay: float = 0.5

    def paths(self) -> Template:
        """Best first; a path is only reachable after its parent, so prefixes precede their extensions."""
        def score(path: tuple[int, ...]) -> float:
            return sum(math.log(self.top1) + rank * math.log(self.rank_decay) for rank in path)

        frontier = [(-score((rank,)), 1, (rank,)) for rank in range(self.max_width)]
        heapq.heapify(frontier)
        template: Template = []
        while frontier and len(template) < self.nodes:
            _, length, path = heapq.heappop(frontier)
            template.append(path)
            if length < self.depth:
                for rank in range(self.max_width):
                    heapq.heappush(frontier, (-score(path + (rank,)), length + 1, path + (rank,)))
        return template


# "cpu": 16 nodes, depths 1-5 (4/6/4/1/1 per level); "gpu": 80 nodes, depths 1-7 (5/15/20/15/17/7/1 per level)
PRESETS = {"cpu": TemplateShape(nodes=16, max_width=4, depth=6), "gpu": TemplateShape(nodes=80, max_width=8, depth=8)}


def check_template(paths: Sequence[Sequence[int]], k: int) -> Template:
    template, seen = [tuple(int(rank) for rank in path) for path in paths], {()}
    for path in template:
        if not path or path[:-1] not in seen or not all(0 <= rank < k for rank in path):
            raise ValueError(f"bad template path {list(path)}: paths must be non-empty, list their parent path "
                             f"earlier and use ranks in [0, k={k})")
        seen.add(path)
    return template


def build_templates(template: str | Sequence[Sequence[int]], k: int, **shape) -> dict[str, Template]:
    """Rank paths per device kind: "auto" = the preset named after the kind, a preset name or an explicit template
    = the same for both. A preset is narrowed to k ranks; `shape` (nodes / max_width / depth) overrides it."""
    if not isinstance(template, str):
        return dict.fromkeys(PRESETS, check_template(template, k))
    if template not in (*PRESETS, "auto"):
        raise ValueError(f"unknown template {template!r}; presets: auto, {', '.join(PRESETS)}")

    def preset(name: str) -> Template:
        narrowed = replace(PRESETS[name], max_width=min(PRESETS[name].max_width, k))
        return check_template(replace(narrowed, **shape).paths(), k)

    return {kind: preset(kind if template == "auto" else template) for kind in PRESETS}


@register_drafter("recycling")
class RecyclingDrafter:
    """k: successors kept per token. template: "auto" (the "gpu" preset on CUDA, else "cpu"), a preset name, or an
    explicit list of rank paths. nodes / max_width / depth override the preset's shape."""

    vocab_size = None  # learns ids from the target's logits: works with any vocabulary

    def __init__(self, k: int = 8, template: str | Sequence[Sequence[int]] = "auto", nodes: int | None = None,
                 max_width: int | None = None, depth: int | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        shape = {name: value for name, value in dict(nodes=nodes, max_width=max_width, depth=depth).items()
                 if value is not None}
        self.templates = build_templates(template, k, **shape)  # device kind ("cpu" / "gpu") -> rank paths
        self.successors: torch.Tensor | None = None  # (V, k) int32, -1 = unknown
        self._observed: torch.Tensor | None = None   # (V,) bool: row came from the target (not from seeding)
        self.reset()

    def reset(self) -> None:
        """New sequence: forget the root and the seeding position; the matrix is kept (see `clear`)."""
        self._root: int | None = None
        self._seeded = 0  # context tokens already used for seeding

    def clear(self) -> None:
        """Forget everything the target said."""
        self.successors = self._observed = None
        self.reset()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the matrix and its flags (0 before the first use)."""
        if self.successors is None:
            return 0
        return self.successors.numel() * self.successors.element_size() + self._observed.numel()

    def template_for(self, device: torch.device) -> Template:
        """The rank paths for a target on `device`."""
        return self.templates["gpu" if device.type == "cuda" else "cpu"]

    def propose(self, ctx: DraftContext) -> DraftTree:
        vocab = ctx.target.vocab_size
        if self.successors is None or self.successors.shape[0] != vocab:
            self._allocate(vocab)
        self._seed(ctx.token_ids)
        self._root = int(ctx.token_ids[-1])
        tokens, parents = self._walk(self.template_for(ctx.target.device), ctx.budget.max_nodes,
                                     ctx.budget.max_depth, vocab)
        return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                         source=("recycling",) * len(tokens))

    def _walk(self, template: Template, max_nodes: int, max_depth: int, vocab: int) -> tuple[list[int], list[int]]:
        """Node for each template path whose parent exists and whose successor is known, in template order."""
        tokens: list[int] = []
        parents: list[int] = []
        node_of: dict[tuple[int, ...], int] = {(): -1}
        taken: set[tuple[int, int]] = set()  # (parent node, token): no duplicate siblings
        rows: dict[int, list[int]] = {}
        matrix = self.successors.numpy()  # a view: a row read is ~10x cheaper than through torch
        for path in template:
            if len(tokens) >= max_nodes:
                break
            parent = node_of.get(path[:-1])
            if parent is None or len(path) > max_depth:
                continue
            parent_token = self._root if parent < 0 else tokens[parent]
            if parent_token not in rows:
                rows[parent_token] = matrix[parent_token].tolist() if parent_token < vocab else [-1] * self.k
            token = rows[parent_token][path[-1]]
            if not 0 <= token < vocab or (parent, token) in taken:
                continue
            taken.add((parent, token))
            node_of[path] = len(tokens)
            tokens.append(token)
            parents.append(parent)
        return tokens, parents

    def observe(self, result) -> None:
        """Row of every scored token := the top-k of its logits; the accepted path (the true context) wins when a
        token occurs more than once."""
        if self.successors is None:
            self._allocate(result.logits.shape[-1])
        tree = result.tree
        row_tokens = [self._root] + list(tree.host_tokens if tree.host_tokens is not None else tree.tokens.tolist())
        on_path = [0] + [1 + node for node in result.accepted_nodes]
        order = [row for row in range(1, len(row_tokens)) if row - 1 not in result.accepted_nodes] + on_path
        latest = {row_tokens[row]: row for row in order
                  if row_tokens[row] is not None and 0 <= row_tokens[row] < self.successors.shape[0]}
        if latest:
            width = min(self.k, result.logits.shape[-1])
            # every row's top-k in one device op and one read (rows picked on the host: no index copy to the device)
            top = result.logits.topk(width, dim=-1).indices.to("cpu", torch.int32)[list(latest.values())]
            index = torch.tensor(list(latest), dtype=torch.long)
            self.successors[index] = torch.nn.functional.pad(top, (0, self.k - width), value=-1)
            self._observed[index] = True
        self._root = result.bonus_token  # the next step's root, even if propose() is skipped

    def _allocate(self, vocab: int) -> None:
        self.successors = torch.full((vocab, self.k), -1, dtype=torch.int32)
        self._observed = torch.zeros(vocab, dtype=torch.bool)

    def _seed(self, token_ids: Sequence[int]) -> None:
        """Unobserved row v gets the tokens that followed v in the newly seen context, most recent first."""
        start = self._seeded if len(token_ids) >= self._seeded else 0
        followers: dict[int, list[int]] = {}
        for i in range(len(token_ids) - 2, max(start - 1, 0) - 1, -1):
            before, after = int(token_ids[i]), int(token_ids[i + 1])
            if 0 <= before < self.successors.shape[0] and 0 <= after < self.successors.shape[0]:
                row = followers.setdefault(before, [])
                if after not in row and len(row) < self.k:
                    row.append(after)
        self._seeded = len(token_ids)
        for before, row in followers.items():
            if not self._observed[before]:
                old = [token for token in self.successors[before].tolist() if token >= 0 and token not in row]
                merged = (row + old)[: self.k]
                self.successors[before] = torch.tensor(merged + [-1] * (self.k - len(merged)), dtype=torch.int32)
