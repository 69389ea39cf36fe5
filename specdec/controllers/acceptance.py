"""How often drafted nodes are accepted, learnt online from verified trees, for every drafter (model-free ones too).

A node is **tested** when the target scored the position it drafts: its parent was accepted (or is the root). The
model keeps, per (depth, rank among siblings), exponentially forgotten counts of tested and accepted nodes and
estimates the chance that a tested node is accepted as (accepted + strength * prior) / (tested + strength). A node's
**value** is the product of those chances along its path: its chance of lying on the accepted path, so the expected
number of accepted tokens of a tree is the sum of its nodes' values.

Rates are made non-increasing in the rank (a later sibling is never worth more than an earlier one), so keeping the
highest-valued nodes keeps every kept node's parent and earlier siblings: what recursive rejection sampling needs
of a trimmed sampled tree (siblings are successive draws, verified in order).

Worked example (prior aside): rates depth 1 rank 0 = 0.8, depth 2 rank 0 = 0.5, depth 1 rank 1 = 0.3; the tree
a(-1) b(0) c(-1) has values a .8, b .4, c .3 (c is a's later sibling): E[accepted] = 1.5."""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy

RANKS = 4  # ranks 0, 1, 2 and 3+


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

    def rates(self) -> numpy.ndarray:
        """(max_depth + 1, RANKS) chance a tested node is accepted, non-increasing in the rank; row 0 unused."""
        if self._rates is None:
            raw = (self.accepted + self.strength * self.prior) / (self.tested + self.strength)
            self._rates = numpy.minimum.accumulate(numpy.clip(raw, 1e-6, 1.0), axis=1)
        return self._rates

    def observe(self, parents: Sequence[int], accepted_nodes: Sequence[int]) -> None:
        """One verified tree: its parents (host) and accepted path."""
        if not parents:
            return
        depth, rank = self.shape(parents)
        accepted = numpy.zeros(len(parents) + 1, dtype=bool)  # accepted[1 + node]; [0]: the root
        accepted[0] = True
        if len(accepted_nodes):
            accepted[numpy.asarray(accepted_nodes) + 1] = True
        tested = accepted[numpy.asarray(parents) + 1]
        self.tested *= self.decay
        self.accepted *= self.decay
        cells = depth[tested] * RANKS + rank[tested]  # flat (depth, rank) cells
        size = self.tested.size
        self.tested += numpy.bincount(cells, minlength=size).reshape(self.tested.shape)
        self.accepted += numpy.bincount(cells, accepted[1:][tested], minlength=size).reshape(self.tested.shape)
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
        rates, last = self.rates(), self.tested.shape[0] - 1
        width = min(width, RANKS)
        heap = [(-rates[1, r], 1, r) for r in range(width)]
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
