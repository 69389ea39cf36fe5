"""Per-phase wall-clock accounting for the decode loop."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class PhaseTimer:
    """Adds the wall seconds of each `with timer("phase"):` block to `seconds[phase]`.

    With `cuda_sync=True` it synchronises the GPU at each boundary, so GPU work is charged to the phase that
    launched it (benchmarks want that; plain generation does not pay for it)."""

    def __init__(self, cuda_sync: bool = False):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda_sync = cuda_sync and torch.cuda.is_available()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.cuda_sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda_sync:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start
