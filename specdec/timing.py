"""Per-phase wall-clock accounting for the decode loop."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Adds the wall seconds of each `with timer("phase"):` block to `seconds[phase]`.

    With `cuda_sync=True` it synchronises the GPU at each boundary, so GPU work is charged to the phase that
    launched it (benchmarks want that; plain generation does not pay for it)."""

    def __init__(self, cuda_sync: bool = False):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda_sync = cuda_sync and torch.cuda.is_available()

    def __call__(self, phase: str) -> _Phase:
        return _Phase(self, phase)


class _Phase:
    """One timed block. A plain class, not `contextlib.contextmanager`: the decode loop times five phases a step,
    and a generator-based context manager costs ~1 us of host time each."""

    __slots__ = ("timer", "phase", "start")

    def __init__(self, timer: PhaseTimer, phase: str):
        self.timer, self.phase = timer, phase

    def __enter__(self) -> None:
        if self.timer.cuda_sync:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def __exit__(self, *exc_info) -> None:
        if self.timer.cuda_sync:
            torch.cuda.synchronize()
        self.timer.seconds[self.phase] += time.perf_counter() - self.start
