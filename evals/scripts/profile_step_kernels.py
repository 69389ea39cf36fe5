"""Where the GPU time of one native step goes, per kernel, for steps of 1 to 64 queries (random-init model of a
`specdec bench-step` shape, bf16, one context): each kernel's mean duration per step from torch.profiler over
eager runs of the step's forward (the same kernels its CUDA graph replays; launch gaps are not counted), and the
graph replay's GPU time beside the sum, so the gaps show as the difference.

    python3 evals/scripts/profile_step_kernels.py OUT.txt [--shape zoo] [--context 2048] [--counts 1,8,16,64]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from host_timing import say  # evals/scripts/host_timing.py
from torch.profiler import ProfilerActivity, profile

from specdec.backends.native import NativeBackend
from specdec.evals.step_bench import SHAPES, build_model, replay_ms
from specdec.tree import DraftTree, host_ancestor_mask

RUNS = 20


def kernel_table(backend: NativeBackend, state, count: int, vocab: int) -> dict[str, float]:
    """Mean microseconds per step of each kernel name (several launches of one name summed) over RUNS forwards."""
    native, length = backend.native, state.length
    tree = DraftTree.chain(torch.randint(0, vocab, (count - 1,)))
    mask = host_ancestor_mask(tree, with_root=True).to(backend.device)
    tokens = torch.randint(0, vocab, (count,), device=backend.device)
    positions = torch.arange(length, length + count, device=backend.device)
    slots = positions.clone()
    step = lambda: native.forward(state.buffer, tokens, positions, slots, length, mask)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(RUNS):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time / RUNS
    return dict(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="zoo", choices=sorted(SHAPES))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--counts", default="1,8,16,64")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    say(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {args.shape} at {args.context} keys")
    model = build_model(args.shape, "sdpa", "cuda", torch.bfloat16)
    vocab = SHAPES[args.shape][5]
    backend = NativeBackend(model, max_len=args.context + max(counts) + 8, buckets=tuple(counts))
    state = backend.prefill(torch.randint(0, vocab, (args.context,)).tolist())
    tables, graphs = {}, {}
    for count in counts:
        tables[count] = kernel_table(backend, state, count, vocab)
        graphs[count] = replay_ms(backend._steps[count, count].graph, 50) * 1e3
    names = sorted({name for table in tables.values() for name in table},
                   key=lambda name: -max(table.get(name, 0.0) for table in tables.values()))
    say("us per step | " + " | ".join(f"T={count:3d}" for count in counts) + " | kernel")
    for name in names:
        say("            | " + " | ".join(f"{tables[count].get(name, 0.0):5.1f}" for count in counts) + f" | {name}")
    say("kernel sum  | " + " | ".join(f"{sum(tables[count].values()):5.0f}" for count in counts))
    say("graph GPU   | " + " | ".join(f"{graphs[count]:5.0f}" for count in counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
