"""The two schedules every speculative decoder starts from: a fixed budget, and HF's +2 / -1 heuristic."""

from __future__ import annotations

from typing import Sequence

from specdec.controllers.base import Budget, StepStats, register_controller


@register_controller("static")
class StaticController:
    """The same budget every step: a chain of `max_depth` tokens, or a tree of up to `max_nodes` nodes."""

    def __init__(self, max_depth: int = 8, max_nodes: int | None = None, min_confidence: float | None = None):
        self._budget = Budget(max_nodes=max_depth if max_nodes is None else max_nodes, max_depth=max_depth,
                              min_confidence=min_confidence)

    def budget(self, history: Sequence[StepStats]) -> Budget:
        return self._budget

    def observe(self, step: StepStats) -> None:
        pass


@register_controller("heuristic")
class HeuristicController:
    """HF assisted generation's schedule: draft depth +2 after a fully accepted draft, -1 (not below 1) otherwise.

    The depth is a function of this generation's history alone (each generation starts at `start_depth`), so a
    seeded generation is reproducible. `tree_width` scales the node budget for drafters that can branch
    (nodes = depth * tree_width)."""

    def __init__(self, start_depth: int = 8, max_depth: int = 32, tree_width: int = 2):
        if not 1 <= start_depth <= max_depth:
            raise ValueError(f"need 1 <= start_depth <= max_depth, got {start_depth} and {max_depth}")
        self.start_depth, self.max_depth, self.tree_width = start_depth, max_depth, tree_width
        self._folded = (0, start_depth)  # (steps of history folded in, depth after them)

    def budget(self, history: Sequence[StepStats]) -> Budget:
        depth = self._depth_after(history)
        return Budget(max_nodes=depth * self.tree_width, max_depth=depth)

    def observe(self, step: StepStats) -> None:
        pass  # the schedule reads the history it is given

    def _depth_after(self, history: Sequence[StepStats]) -> int:
        """Fold the +2 / -1 rule over the history, resuming from the last fold when the history only grew."""
        folded, depth = self._folded if self._folded[0] <= len(history) else (0, self.start_depth)
        for step in history[folded:]:
            if step.draft_depth == 0:
                continue  # nothing was drafted: no evidence either way
            full = step.accepted_len >= step.draft_depth
            depth = min(depth + 2, self.max_depth) if full else max(depth - 1, 1)
        self._folded = (len(history), depth)
        return depth
