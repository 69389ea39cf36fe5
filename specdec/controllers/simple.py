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

    The depth carries over from one generation to the next, as HF's `num_assistant_tokens` does. `tree_width`
    scales the node budget for drafters that can branch (nodes = depth * tree_width)."""

    def __init__(self, start_depth: int = 8, max_depth: int = 32, tree_width: int = 2):
        if not 1 <= start_depth <= max_depth:
            raise ValueError(f"need 1 <= start_depth <= max_depth, got {start_depth} and {max_depth}")
        self.depth = start_depth
        self.max_depth = max_depth
        self.tree_width = tree_width

    def budget(self, history: Sequence[StepStats]) -> Budget:
        return Budget(max_nodes=self.depth * self.tree_width, max_depth=self.depth)

    def observe(self, step: StepStats) -> None:
        if step.draft_depth == 0:
            return  # nothing was drafted: no evidence either way
        if step.accepted_len >= step.draft_depth:
            self.depth = min(self.depth + 2, self.max_depth)
        else:
            self.depth = max(self.depth - 1, 1)
