"""What the GPU profiling scripts share: `say` (print, and keep the output file current) and `timed` (median wall
seconds of a function, the GPU drained before and after each run)."""

import sys
import time

import torch

lines: list[str] = []


def say(text: str) -> None:
    """Print, and rewrite the output file (the script's first argument, if any) with everything so far: a reader
    that stops early loses nothing."""
    lines.append(text)
    print(text, flush=True)
    if len(sys.argv) > 1:
        open(sys.argv[1], "w").write("\n".join(lines) + "\n")


def timed(fn, repeats: int = 5) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
