"""Stop growing a draft when one more draft forward costs more time than its tokens are expected to save.

A step makes τ tokens in T seconds (verify + draft + the rest). One more depth costs a draft forward, t_d seconds,
and adds g expected accepted tokens, so it pays iff (τ + g) / (T + t_d) > τ / T, that is iff

    g > t_d · τ / T.

g: the next depth's nodes are the frontier's children; a child can be accepted only if its parent is (the chance
the parent's score estimates, calibrated or not), and then with the chance a top child is accepted (the drafter
passes the rate it has measured, or 1 without one). So g ~ rate · Σ over the frontier of its scores, an upper bound
when the tree is full and new nodes displace old ones: the stop errs on the side of drafting.

τ, T and t_d are running averages of this drafter's own steps: τ from each verification (accepted + 1), T the time
between consecutive `propose` calls of one sequence, t_d the time of each depth's draft forward up to its host read.
Until all three have a value, every depth is drafted. The stop depends on scores and timings, never on a node's
token, so sampled drafts stay exact draws of their q (as `ModelDrafter` needs)."""

from __future__ import annotations


class CostStop:
    """decay: weight of the old value in each running average (0.9: about the last 10 observations)."""

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.tau: float | None = None           # tokens per step
        self.step_seconds: float | None = None  # T
        self.depth_seconds: float | None = None  # t_d
        self._last_step: float | None = None   # when the previous propose of this sequence began

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1.0 - self.decay) * new

    def new_sequence(self) -> None:
        """The next step's period would include a prefill: do not count it."""
        self._last_step = None

    def step_started(self, now: float) -> None:
        if self._last_step is not None:
            self.step_seconds = self._average(self.step_seconds, now - self._last_step)
        self._last_step = now

    def depth_ran(self, seconds: float) -> None:
        self.depth_seconds = self._average(self.depth_seconds, seconds)

    def observe(self, accepted: int) -> None:
        self.tau = self._average(self.tau, accepted + 1.0)

    def worth(self, gain: float) -> bool:
        """Whether one more depth, adding `gain` expected tokens, raises the tokens per second."""
        if self.tau is None or self.step_seconds is None or self.depth_seconds is None or self.step_seconds <= 0:
            return True
        return gain > self.depth_seconds * self.tau / self.step_seconds
