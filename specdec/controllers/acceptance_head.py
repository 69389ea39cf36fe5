"""`acceptance_head` (SpecDec++): a trained head stops the draft once P(any rejection) passes a threshold h.

Between a model drafter's depths, the head (`specdec.train.acceptance_head`) reads the draft model's last hidden
state where each frontier token was drafted and gives p, its chance of acceptance given its path so far. The
controller keeps **survival** = Π p along the draft (reset at depth 1) and stops when 1 - survival > h.

h given: SpecDec++'s fixed threshold. h None: derived every depth from the cost model, with the same marginal rule
as `CostAware.keep_drafting` but the head's numbers instead of the drafter's scores: one more depth is drafted
while survival * rate(next depth) > R * (its draft and verify seconds), i.e. h = 1 - R * seconds / rate(next
depth); `report()` gives the mean h used. A tree frontier has several nodes and no node ids: survival then
follows the most likely frontier node per depth (for a chain, the only one, it is exact), and the expected gain
sums survival_before * p over the frontier.

Drafters without hidden states (n-gram, graphs=True, early exit) get `CostAware.keep_drafting`. The budget is the
largest one (the head cuts the draft), with the plain-run fallback and probes of `CostAware`; no trim.

    controller = AcceptanceHeadController(head="head.safetensors", h=0.7)   # or "acceptance_head:head=...,h=0.7"
"""

from __future__ import annotations

import os
import time

import torch

from specdec.controllers.adaptive import SOLVE_DEPTHS, CostAware
from specdec.controllers.base import Budget, Frontier, register_controller


@register_controller("acceptance_head")
class AcceptanceHeadController(CostAware):
    """head: an `AcceptanceHead` or the path of a saved one (`specdec train acceptance-head`); h: stop once
    1 - Π p > h, in (0, 1) (None: derived from the cost model, module docstring); the rest: `CostAware`'s options
    (max_depth, max_nodes: the budget the head cuts)."""

    wants_hidden = True  # model drafters compute the draft's hidden states for `keep_drafting` only when asked

    def __init__(self, head=None, h: float | None = None, **cost_options):
        from specdec.train.acceptance_head import AcceptanceHead

        super().__init__(**cost_options)
        if head is None:
            raise ValueError("the acceptance_head controller needs head=PATH, a file written by `specdec train "
                             "acceptance-head`")
        if h is not None and (isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 < h < 1.0):
            raise ValueError(f"h (the stop threshold on P(any rejection)) must be in (0, 1), got {h!r}; "
                             f"leave it out to derive it from the cost model")
        self.head = head if isinstance(head, AcceptanceHead) else AcceptanceHead.load(os.fspath(head))
        self.h = None if h is None else float(h)
        self._placed = None  # (device, dtype) the head was moved to
        self._survival = 1.0
        self._decisions = dict(head_calls=0, head_stops=0, h_sum=0.0)

    def prepare(self, backend, prompt_ids) -> None:
        super().prepare(backend, prompt_ids)
        self._decisions = dict(head_calls=0, head_stops=0, h_sum=0.0)

    def keep_drafting(self, frontier: Frontier) -> bool:
        if frontier.hidden is None:
            return super().keep_drafting(frontier)
        started = time.perf_counter()
        with torch.no_grad():
            accept = self._head_for(frontier.hidden).probability(frontier.hidden).double()
        before = 1.0 if frontier.depth == 1 else self._survival
        paths = (before * accept).tolist()  # the host read of this decision
        self._survival = max(paths)
        h = self.h if self.h is not None else self._derived_h(frontier, paths)
        keep = 1.0 - self._survival <= h
        self._decisions["head_calls"] += 1
        self._decisions["head_stops"] += not keep
        self._decisions["h_sum"] += h
        self._counters["controller_s"] += time.perf_counter() - started
        return keep

    def report(self) -> dict:
        out = super().report()
        calls = self._decisions["head_calls"]
        out.update(head_calls=calls, head_stops=self._decisions["head_stops"],
                   head_h=self._decisions["h_sum"] / calls if calls else self.h)
        return out

    def _derived_h(self, frontier: Frontier, paths: list[float]) -> float:
        """The h at which the next depth's expected tokens, Σ paths * rate(next depth), just pay for its seconds at
        the measured rate R (`CostAware.keep_drafting`'s rule); 1 (never stop) before anything is measured."""
        if self.cost is None or not self._seconds:
            return 1.0
        depth, cost = frontier.depth, self.cost
        rates = self.acceptance.rates()
        nodes = max(frontier.nodes, depth)
        seconds = (cost.draft_s(depth + 1) - cost.draft_s(depth)
                   + cost.verify_s(nodes + len(paths)) - cost.verify_s(nodes))
        gain = sum(paths) * float(rates[min(depth + 1, rates.shape[0] - 1), 0])
        needed = self.rate() * seconds
        # keep iff gain > needed; gain is proportional to survival, so as a cut on survival (= 1 - h):
        cut = self._survival * needed / gain if gain > 0 else float(needed > 0)
        return min(max(1.0 - cut, 0.0), 1.0)

    def _head_for(self, hidden):
        """The head on `hidden`'s device and dtype (moved at first use); a clear error for another draft's width."""
        if hidden.shape[-1] != self.head.config.hidden_size:
            raise ValueError(f"acceptance head was trained for a draft of hidden size {self.head.config.hidden_size}, "
                             f"the draft model's hidden states have {hidden.shape[-1]}; train a head for this draft "
                             f"(specdec train acceptance-head)")
        if self._placed != (hidden.device, hidden.dtype):
            self.head = self.head.to(hidden.device, hidden.dtype).eval()
            self._placed = (hidden.device, hidden.dtype)
        return self.head

    def _solve(self) -> tuple[Budget, float]:
        """The largest budget (the head cuts the draft) and, for the plain-run comparison, the best expected rate
        of a draft under the positional acceptance model (goodput's estimate)."""
        values, depths = self._best_first()
        rates = [float(self._ratios(values[depths <= depth], depth).max()) for depth in SOLVE_DEPTHS
                 if depth <= self.max_depth and (depths <= depth).any()]
        return Budget(self.max_nodes, self.max_depth), max(rates, default=0.0)
