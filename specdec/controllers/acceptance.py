"""How often drafted nodes are accepted, learnt online from verified trees, for every drafter (model-free ones too).

A node is **tested** when the target scored the position it drafts: its parent was accepted (or is the root). The
model keeps, per (depth, rank among siblings), exponentially forgotten counts of tested and accepted nodes and
estimates the chance that a tested node is accepted as (accepted + strength * prior) / (tested + strength). A node's
**value** is the product of those chances along its path: its chance of lying on the accepted path, so the expected
number of accepted tokens of a tree is the sum of its nodes' values.

A cell seldom tested leans on its neighbours (`rates`). Rates are made non-increasing in the rank (a later sibling
is never worth more than an earlier one), so keeping the
highest-valued nodes keeps every kept node's parent and earlier siblings: what recursive rejection sampling needs
of a trimmed sampled tree (siblings are successive draws, verified in order).

Worked example (prior aside): rates depth 1 rank 0 = 0.8, depth 2 rank 0 = 0.5, depth 1 rank 1 = 0.3; the tree
a(-1) b(0) c(-1) has values a .8, b .4, c .3 (c is a's later sibling): E[accepted] = 1.5."""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy

RANKS = 4  # ranks 0, 1, 2 and 3+
DECAY_EVERY = 8  # trees between applications of the forgetting (decay ** 8 at once)


class AcceptanceModel:
    """max_depth: deeper nodes share the last depth's row; prior, strength: the rate before evidence and how many
    tests outweigh it; decay: each verified tree multiplies the old counts by it (0.97: about the last 30 trees)."""

    def __init__(self, max_depth: int = 32, prior: float = 0.5, strength: float = 2.0, decay: float = 0.97):
        if not 0.0 < prior <= 1.0 or strength <= 0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"need 0 < prior <= 1, strength > 0, 0 < decay <= 1; got {prior}, {strength}, {decay}")
        self.prior, self.strength, self.decay = prior, strength, decay
        self.tested = numpy.zeros((max_depth + 1, RANKS))
        self.accepted = numpy.zeros((max_depth + 1, RANKS))
        self._shapes: dict[tuple[int, ...], tuple[numpy.ndarray, numpy.ndarray]] = {}
        self._rates: numpy.ndarray | None = None
        self._observed = 0
        self._flat = (self.tested.reshape(-1), self.accepted.reshape(-1))  # views: counts by flat cell

    def rates(self) -> numpy.ndarray:
        """(max_depth + 1, RANKS) chance a tested node is accepted, non-increasing in the rank; row 0 unused.

        A cell's prior is its neighbour's estimate, not a constant: depth d's is depth d - 1's (same rank), and at
        depth 1 rank r's is half of rank r - 1's (rank 0: `prior`). Cells that are rarely tested (deep nodes,
        late siblings) so inherit what was measured nearby instead of an optimistic constant."""
        if self._rates is None:
            rates = numpy.empty_like(self.tested)
            rates[0] = 1.0
            for depth in range(1, rates.shape[0]):
                for rank in range(RANKS):
                    if depth > 1:
                        prior = rates[depth - 1, rank]
                    else:
                        prior = self.prior if rank == 0 else 0.5 * rates[1, rank - 1]
                    rate = (self.accepted[depth, rank] + self.strength * prior) / (self.tested[depth, rank]
                                                                                  + self.strength)
                    rates[depth, rank] = min(max(rate, 1e-6), 1.0, rates[depth, rank - 1] if rank else 1.0)
            self._rates = rates
        return self._rates

    def observe(self, parents: Sequence[int], accepted_nodes: Sequence[int]) -> None:
        """One verified tree: its parents (host) and accepted path (root's child first). One pass in plain
        Python over the parents, looking only at the tested nodes (the children of the root and of the accepted
        path): numpy's per-call cost would dominate for trees of tens of nodes, and so would a full shape."""
        if not parents:
            return
        depth_below = {-1: 1}  # a tested node's depth, by its parent
        for depth, node in enumerate(accepted_nodes, start=2):
            depth_below[node] = depth
        accepted, siblings, last = set(accepted_nodes), {}, self.tested.shape[0] - 1
        tested, hits = self._flat
        for node, parent in enumerate(parents):
            depth = depth_below.get(parent)
            if depth is None:
                continue
            rank = siblings.get(parent, 0)
            siblings[parent] = rank + 1
            cell = min(depth, last) * RANKS + min(rank, RANKS - 1)
            tested[cell] += 1.0
            if node in accepted:
                hits[cell] += 1.0
        self._observed += 1
        if self._observed % DECAY_EVERY == 0:  # forgetting in batches: one pair of array products per 8 trees
            self.tested *= self.decay ** DECAY_EVERY
            self.accepted *= self.decay ** DECAY_EVERY
        self._rates = None

    def values(self, parents: Sequence[int]) -> numpy.ndarray:
        """(N,) each node's chance of lying on the accepted path (the module docstring)."""
        depth, rank = self.shape(parents)
        own = self.rates()[depth, rank]
        if all(parent == node - 1 for node, parent in enumerate(parents)):  # a chain
            return numpy.cumprod(own)
        value = own.copy()
        for node, parent in enumerate(parents):
            if parent >= 0:
                value[node] *= value[parent]
        return value

    def best_tree(self, max_nodes: int, max_depth: int, width: int = RANKS) -> tuple[numpy.ndarray, numpy.ndarray]:
        """The `max_nodes` nodes of highest value in the tree of every rank < width to depth max_depth (best
        first: Sequoia's optimal tree under these positional rates) -> (values, depths), best first."""
        rates, last = self.rates().tolist(), self.tested.shape[0] - 1  # Python floats: ~3x faster than numpy's here
        width = min(width, RANKS)
        heap = [(-rates[1][r], 1, r) for r in range(width)]
        heapq.heapify(heap)
        values, depths = [], []
        while heap and len(values) < max_nodes:
            negative, depth, _ = heapq.heappop(heap)
            values.append(-negative)
            depths.append(depth)
            if depth < max_depth:
                below = rates[min(depth + 1, last)]
                for r in range(width):
                    heapq.heappush(heap, (negative * below[r], depth + 1, r))
        return numpy.asarray(values), numpy.asarray(depths, dtype=int)

    def shape(self, parents: Sequence[int]) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(depth, rank) rows of each node, the depth capped at max_depth (cached per tree shape)."""
        key = tuple(parents)
        found = self._shapes.get(key)
        if found is None:
            depth, rank, children = [], [], {}
            for parent in key:
                depth.append(1 if parent < 0 else depth[parent] + 1)
                rank.append(min(children.get(parent, 0), RANKS - 1))
                children[parent] = children.get(parent, 0) + 1
            found = (numpy.minimum(depth, self.tested.shape[0] - 1), numpy.asarray(rank, dtype=int))
            if len(self._shapes) > 512:
                self._shapes.clear()
            self._shapes[key] = found
        return found
