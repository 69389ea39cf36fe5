"""`fused`: several drafters' trees merged under one node budget (SAMD-like, CopySpec + SD).

Every sub-drafter proposes for the same context and budget; their trees are merged as tries: nodes with the same
token path from the root become one node. Nodes are taken in budget order (`policy`):
- "priority":   the first drafter's whole tree, then the second's new nodes, and so on;
- "acceptance": one node from each drafter in turn, drafters ordered by their recent accepted tokens per step (an
  exponential average; ties keep the list order).
Once the budget is full no node is added, but later drafters still get credit for nodes they share.

`source[i]` of the merged tree names every sub-drafter that proposed node i, joined by "+" in list order
("copyspec+ngram"). Names are the registered names, "#2", "#3" ... appended to repeats ("ngram", "ngram#2").
The merged tree is deterministic (`draft_probs` None): a node two drafters sampled from different distributions
has no single q, and the verifier's one-hot treatment stays lossless for any drafts. Its `match_len` is the leading
tree's (the one whose first node is the merged tree's first): a copying drafter's evidence for the controllers'
acceptance classes survives the merge, and a step where it found nothing (the others' trees lead) is class 0.

Example: drafter a proposes "1 2 3" and "1 4", drafter b "1 2 5" and "6"; max_nodes=5, policy "priority" gives
tokens [1, 2, 3, 4, 5], parents [-1, 0, 1, 0, 1], sources ["a+b", "a+b", "a", "a", "b"]; "6" did not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.drafters.base import DraftContext, Drafter, make_drafter, register_drafter
from specdec.tree import DraftTree


@dataclass
class SourceStats:
    """Per sub-drafter: tree nodes it proposed that were verified, accepted tokens among them, propose() errors."""

    proposed: int = 0
    accepted: int = 0
    errors: int = 0
    recent: float = 0.0  # exponential average of accepted tokens per step

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@register_drafter("fused")
class FusedDrafter:
    """drafters: "a+b" (drafter specs joined by "+") or a list of specs / drafter objects."""

    def __init__(self, drafters: str | Sequence[str | Drafter] = "ngram", policy: str = "priority",
                 decay: float = 0.8):
        if policy not in ("priority", "acceptance"):
            raise ValueError(f"policy must be 'priority' or 'acceptance', got {policy!r}")
        specs = drafters.split("+") if isinstance(drafters, str) else list(drafters)
        self.drafters = [make_drafter(spec.strip() if isinstance(spec, str) else spec) for spec in specs]
        if not self.drafters:
            raise ValueError("fused needs at least one drafter, e.g. 'fused:drafters=ngram+retrieval'")
        self.names = _unique_names(self.drafters)
        vocabs = {name: getattr(d, "vocab_size", None) for name, d in zip(self.names, self.drafters)}
        vocabs = {name: vocab for name, vocab in vocabs.items() if vocab is not None}
        if len(set(vocabs.values())) > 1:
            raise ValueError(f"sub-drafters disagree on the vocabulary: {vocabs}; fuse drafters of one tokenizer")
        self.vocab_size = next(iter(vocabs.values()), None)
        self.policy, self.decay = policy, decay
        self.stats = {name: SourceStats() for name in self.names}

    def propose(self, ctx: DraftContext) -> DraftTree:
        trees = {}
        for name, drafter in self._ranked():
            try:
                tree = drafter.propose(ctx)
            except Exception:  # noqa: BLE001 - a failing sub-drafter sits this step out; the others still draft
                self.stats[name].errors += 1
                continue
            if isinstance(tree, DraftTree) and len(tree):
                trees[name] = tree
        return merge_trees(trees, ctx.budget.max_nodes, ctx.budget.max_depth, self.names,
                           interleave=self.policy == "acceptance")

    def observe(self, result) -> None:
        accepted_nodes, accepted = set(result.accepted_nodes), {name: 0 for name in self.names}
        for node, source in enumerate(result.tree.source or ()):
            for name in source.split("+"):
                if name in self.stats:
                    self.stats[name].proposed += 1
                    accepted[name] += node in accepted_nodes
        for name, count in accepted.items():
            self.stats[name].accepted += count
            self.stats[name].recent = self.decay * self.stats[name].recent + (1 - self.decay) * count
        self._forward("observe", result)

    def reset(self) -> None:
        self._forward("reset")

    def source_stats(self) -> dict[str, SourceStats]:
        """Sub-drafter name -> its statistics since construction (a copy)."""
        return {name: SourceStats(**vars(stats)) for name, stats in self.stats.items()}

    def _ranked(self) -> list[tuple[str, Drafter]]:
        pairs = list(zip(self.names, self.drafters))
        if self.policy == "acceptance":
            pairs.sort(key=lambda pair: -self.stats[pair[0]].recent)  # stable: ties keep the list order
        return pairs

    def _forward(self, method: str, *args) -> None:
        for name, drafter in zip(self.names, self.drafters):
            try:
                getattr(drafter, method)(*args)
            except Exception:  # noqa: BLE001 - one broken sub-drafter must not stop the others learning
                self.stats[name].errors += 1


def merge_trees(trees: dict[str, DraftTree], max_nodes: int, max_depth: int | None = None,
                order: Sequence[str] = (), interleave: bool = False) -> DraftTree:
    """Trie-merge `trees` (name -> tree, in budget order) into at most `max_nodes` nodes no deeper than
    `max_depth`; `source` of a merged node joins the names that proposed it in `order` (default: the dict's)."""
    node_of: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    proposers: list[set[str]] = []
    mapped = {name: [None] * len(tree) for name, tree in trees.items()}  # sub-tree node -> merged node
    sub_tokens = {name: tree.tokens.tolist() for name, tree in trees.items()}
    sub_parents = {name: tree.host_parents for name, tree in trees.items()}
    for name, node in _visit_order(trees, interleave):
        parent = sub_parents[name][node]
        merged_parent = -1 if parent < 0 else mapped[name][parent]
        if merged_parent is None:
            continue  # its parent did not fit
        key = (merged_parent, sub_tokens[name][node])
        depth = 1 if merged_parent < 0 else depths[merged_parent] + 1
        if key not in node_of and len(tokens) < max_nodes and (max_depth is None or depth <= max_depth):
            node_of[key] = len(tokens)
            tokens.append(key[1])
            parents.append(merged_parent)
            depths.append(depth)
            proposers.append(set())
        if key in node_of:
            mapped[name][node] = node_of[key]
            proposers[node_of[key]].add(name)
    rank = {name: i for i, name in enumerate(list(order) or list(trees))}
    source = tuple("+".join(sorted(names, key=rank.__getitem__)) for names in proposers)
    leading = next((tree.match_len for tree in trees.values() if len(tree)), 0)  # merged node 0: its node 0
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), source=source,
                     match_len=leading)


def _visit_order(trees: dict[str, DraftTree], interleave: bool):
    """(name, node) pairs: tree after tree, or round-robin one node of each tree at a time."""
    if not interleave:
        return [(name, node) for name, tree in trees.items() for node in range(len(tree))]
    longest = max((len(tree) for tree in trees.values()), default=0)
    return [(name, node) for node in range(longest) for name, tree in trees.items() if node < len(tree)]


def _unique_names(drafters: Sequence[Drafter]) -> list[str]:
    names: list[str] = []
    for drafter in drafters:
        base = str(getattr(drafter, "name", type(drafter).__name__)).replace("+", "_")  # "+" joins sources
        repeats = sum(name == base or name.startswith(base + "#") for name in names)
        names.append(base if not repeats else f"{base}#{repeats + 1}")
    return names
