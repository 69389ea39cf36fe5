"""Online calibration of a model drafter's tree scores: how often a node is accepted, learnt from verification.

A dynamic tree keeps the nodes with the largest scores, and a score should be the chance that the node lies on the
accepted path: the product, along the path, of each node's chance of being accepted once its parent is. The draft's
own slot probability is a poor estimate of that chance. Greedy verification accepts the target's argmax, not a
draw from its distribution: a draft distilled on the target's probabilities puts 0.5 on a top token the target
picks 85% of the time, and 0.3 on a runner-up it picks 10% of the time, so scoring by probability builds trees too
wide and too shallow (measured on the CPU zoo pair: a 15-node tree of width 4 accepted fewer tokens than the 7-node
chain inside it).

`Calibration` counts, per (rank among siblings, slot-probability bin), how many nodes were tested (their parent was
accepted, or is the root) and how many of those were accepted, and estimates the chance as (accepted + k p) / (tested
+ k): the draft's own probability p until the bin has seen about k tests, the measured rate after. The estimate
depends on a node's rank and slot probability only, never on its token, so at temperature > 0 the kept nodes are
still the exact draws `ModelDrafter` documents. It is in (0, 1], so a child never outscores its parent and every
kept node's parent is kept."""

from __future__ import annotations

import bisect

import numpy

EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)  # upper edges of all bins but the last
RANKS = 4  # ranks 0, 1, 2 and 3+ (the fourth and later siblings share a row)
FLOOR = 1e-6  # the smallest estimate: a score stays > 0 and ties break as uncalibrated ones do


class Calibration:
    """strength: how many tests a bin needs before its measured rate outweighs the draft's probability."""

    def __init__(self, strength: float = 8.0):
        if strength <= 0:
            raise ValueError(f"strength must be > 0, got {strength}")
        self.strength = float(strength)
        self.tested = numpy.zeros((RANKS, len(EDGES) + 1))
        self.accepted = numpy.zeros((RANKS, len(EDGES) + 1))

    @staticmethod
    def _cell(rank: int, prob: float) -> tuple[int, int]:
        return min(rank, RANKS - 1), bisect.bisect_left(EDGES, prob)

    def estimate(self, rank: int, prob: float) -> float:
        """The chance that a node of this rank and slot probability is accepted once its parent is."""
        cell = self._cell(rank, prob)
        rate = (self.accepted[cell] + self.strength * prob) / (self.tested[cell] + self.strength)
        return min(max(rate, FLOOR), 1.0)

    def top_rate(self) -> float:
        """How often a top child (rank 0) was accepted once its parent was, over all bins (1.0 before any test)."""
        tested = self.tested[0].sum()
        return float(self.accepted[0].sum() / tested) if tested else 1.0

    def observe(self, parents: list[int], ranks: list[tuple[int, float]], accepted_nodes: list[int]) -> None:
        """One verified tree: parents[i] (-1 = the root), ranks[i] = (rank, slot probability), the accepted path."""
        parent = numpy.asarray(parents, dtype=int)
        accepted = numpy.zeros(len(parents) + 1, dtype=bool)  # accepted[1 + node]; accepted[0]: the root
        accepted[0], accepted[numpy.asarray(accepted_nodes, dtype=int) + 1] = True, True
        tested = accepted[parent + 1]  # the target scored the position these nodes draft: their parent was accepted
        rank, prob = numpy.asarray(ranks, dtype=float).reshape(-1, 2)[tested].T
        cells = numpy.minimum(rank.astype(int), RANKS - 1), numpy.searchsorted(EDGES, prob, side="left")
        numpy.add.at(self.tested, cells, 1)
        numpy.add.at(self.accepted, cells, accepted[1:][tested])
