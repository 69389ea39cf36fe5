"""Does reading weights into L2 beside the attention shorten the native step? (`kernels/l2_prefetch.py`)

1. The prefetch kernel alone: GB/s reading a 256 MiB buffer, per (programs, block, warps).
2. The native step (random-init models of real shapes, bf16, context 2048): the graph replay's GPU time and the
   step's wall time for budgets of 0 (off) and several MiB per layer, in interleaved rounds (machine drift spreads
   over every budget alike), AR (1 query) and verify steps of 16 and 64 queries (64: the unfused path, no prefetch:
   a control); and the AR step's logits with and without prefetch, which must be bitwise equal.

    python3 evals/scripts/prefetch_bench.py OUT.txt [--shapes 1b,7b,zoo] [--budgets 0,8,16,24,32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_timing import say  # noqa: E402

from specdec.backends.native import NativeBackend  # noqa: E402
from specdec.evals.step_bench import SHAPES, _kernel_ms, _median_ms, build_model, replay_ms, weight_floor_ms  # noqa
from specdec.kernels.l2_prefetch import l2_prefetch  # noqa: E402
from specdec.tree import DraftTree  # noqa: E402

MIB = 2 ** 20


def kernel_sweep(reps: int) -> list[dict]:
    buffer = torch.randn(128 * MIB, device="cuda", dtype=torch.bfloat16)  # 256 MiB: past the 50 MB of L2
    rows = []
    for programs, block, warps in [(p, b, w) for p in (32, 64, 132, 264) for b in (4096, 8192, 16384) for w in (4, 8)]:
        sink = torch.zeros(1, programs, dtype=torch.int32, device="cuda")
        ms = _kernel_ms(lambda: l2_prefetch([buffer], sink, programs, block, warps), reps, calls=4)
        rows.append({"programs": programs, "block": block, "warps": warps, "ms": ms,
                     "gb_s": buffer.numel() * 2 / ms / 1e6})
        say(f"prefetch alone: programs {programs:3d} block {block:5d} warps {warps}: {rows[-1]['gb_s']:.0f} GB/s")
    return rows


def step_times(model, vocab: int, budget_mib: float, context: int, counts: list[int], reps: int) -> dict:
    backend = NativeBackend(model, max_len=context + max(counts) + 8, buckets=tuple(counts))
    backend.native.set_prefetch(int(budget_mib * MIB))  # before the prefill: it captures the graphs
    torch.manual_seed(1)
    state = backend.prefill(torch.randint(0, vocab, (context,)).tolist())
    out = {}
    for n in counts:
        tree = DraftTree.chain(torch.randint(0, vocab, (n - 1,))).to(backend.device)

        def step():
            backend.score_tree(state, 7, tree)
            backend.commit(state, [], len(tree))
            state.length -= 1  # the root stays uncommitted: every repetition scores the same positions

        out[f"step{n}_ms"] = _median_ms(step, reps)
        out[f"graph{n}_ms"] = replay_ms(backend._steps[n, n].graph, reps)
    logits = backend.score_tree(state, 7, DraftTree.chain(torch.zeros(0, dtype=torch.long)).to(backend.device))
    out["ar_logits"] = logits.float().cpu()
    return out


def shape_rows(shape: str, budgets: list[float], rounds: int, context: int, reps: int) -> list[dict]:
    model = build_model(shape, "sdpa", "cuda", torch.bfloat16)
    vocab, counts = SHAPES[shape][5], [1, 16, 64]
    runs: dict[float, list[dict]] = {budget: [] for budget in budgets}
    for round_index in range(rounds):
        for budget in budgets if round_index % 2 == 0 else budgets[::-1]:
            runs[budget].append(step_times(model, vocab, budget, context, counts, reps))
            gc.collect()  # the last backend (its fused weights, cache and graphs) sits in reference cycles
            torch.cuda.empty_cache()
    reference = runs[budgets[0]][0]["ar_logits"]
    rows = []
    for budget, results in runs.items():
        row = {"shape": shape, "context": context, "budget_mib": budget, "floor_ms": weight_floor_ms(model),
               "ar_logits_equal_to_budget_0": all(torch.equal(r["ar_logits"], reference) for r in results)}
        for key in [k for k in results[0] if k.endswith("_ms")]:
            row[key] = statistics.median(r[key] for r in results)
        rows.append(row)
        say(f"{shape} ctx {context} prefetch {budget:4.0f} MiB: " + ", ".join(
            f"T={n} graph {row[f'graph{n}_ms']:.3f} step {row[f'step{n}_ms']:.3f}" for n in counts)
            + f" ms; AR graph / floor {row['graph1_ms'] / row['floor_ms']:.2f}x; logits equal "
            f"{row['ar_logits_equal_to_budget_0']}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the printed lines go here, the results to the same name .json")
    parser.add_argument("--shapes", default="1b,7b,zoo")
    parser.add_argument("--budgets", default="0,8,16,24,32", help="MiB per layer; 0 (off) first: the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    say(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    result = {"device": torch.cuda.get_device_name(), "kernel": [] if args.no_sweep else kernel_sweep(args.reps),
              "steps": []}
    budgets = [float(b) for b in args.budgets.split(",")]
    for shape in args.shapes.split(","):
        result["steps"] += shape_rows(shape, budgets, args.rounds, args.context, args.reps)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
