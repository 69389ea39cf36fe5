"""GPU measurement for verify steps of T = 2..64 queries: each kind of fused row GEMM (`kernels/gemm_rows.py`: qkv +
rotary + KV write, o and down + residual, gate/up + SiLU, lm head + norm) at the 1.1B / 7B / zoo shapes and M in
2..64 rows over a small sweep of tile configs, against what the unfused forward launches for the same work (cuBLAS
F.linear with add_rmsnorm / rope_cache / silu_mul beside it) and cuBLAS's bare product; then NativeLlama's whole
verify step with `rows_gemm` off and on at the sweep's best configs (the step as `bench-step` times it, and its
graph's GPU time alone). GPU times are CUDA graphs of 10 back-to-back calls, the median replay over --reps.

    python3 evals/scripts/gemm_rows_bench.py --out DIR [--shapes 1b,7b,zoo] [--quick] [--no-sweep] [--no-steps]
    TRITON_INTERPRET=1 python3 evals/scripts/gemm_rows_bench.py --out DIR --shapes tiny --quick   # CPU smoke run

Writes DIR/gemm_rows_bench.json (every timing) and DIR/rows_tuned.json (the best config per kind, BLOCK_M bucket
and shape: `kernels/gemm_rows.py`'s TUNED table, loaded with SPECDEC_ROWS_TUNED=DIR/rows_tuned.json), printing as
it goes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.backends.native import NativeBackend
from specdec.evals.step_bench import (SHAPES, _kernel_ms, _median_ms, build_model, layer_products, replay_ms,
                                      weight_floor_ms)
from specdec.kernels import gemm_rows
from specdec.kernels.gemm_rows import MAX_ROWS, block_rows, rows_config, rows_gated, rows_linear, rows_qkv_rope
from specdec.kernels.rmsnorm import add_rmsnorm
from specdec.kernels.rope_cache import rope_cache
from specdec.kernels.silu_mul import silu_mul
from specdec.tree import DraftTree

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run under TRITON_INTERPRET=1
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
EPS = 1e-5
COUNTS = (2, 4, 8, 16, 32, 64)


def say(*parts) -> None:
    print(*parts, flush=True)


def candidates(quick: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): 16-128 features a program, 128-512 columns a step (those whose
    stages overflow the shared memory at many rows are refused by the compiler and skipped)."""
    if quick:
        return [(16, 512, 4, 3), (16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3)]
    return [(n, k, w, s) for n in (16, 32, 64, 128) for k in (128, 256, 512) for w in (4, 8) for s in (3, 5)
            if n * k <= 16384]


def calls(shape: str, matrix: str, count: int):
    """(fused(config), unfused(), bare()) for `count` rows of this matrix. unfused: what NativeLlama's unfused
    forward launches for the same work (the residual add of o and down rides in the next add_rmsnorm there)."""
    hidden, _, heads, kv_heads, _, _ = SHAPES[shape]
    head_dim = hidden // heads
    rows, size = layer_products(shape)[matrix]
    kind = matrix.split("_")[0]
    like = dict(device=DEVICE, dtype=DTYPE)
    weight = (torch.randn(2 * rows if kind == "gated" else rows, size, device=DEVICE) * 0.02).to(DTYPE)
    x, delta = torch.randn(count, size, **like), torch.zeros(count, size, **like)
    norm = torch.ones(size, **like)
    stream = torch.zeros(count, rows, **like)
    keys, values = (torch.zeros(kv_heads, 256, head_dim, **like) for _ in range(2))
    cos = torch.ones(256, head_dim, **like)
    where = torch.arange(count, device=DEVICE)
    fused = {"qkv": lambda c: rows_qkv_rope(x, weight, where, where, cos, cos, keys, values, heads, norm, EPS,
                                            config=c),
             "residual": lambda c: rows_linear(x, weight, residual=stream, config=c),
             "gated": lambda c: rows_gated(x, weight, norm, EPS, config=c),
             "norm": lambda c: rows_linear(x, weight, norm, EPS, config=c)}[kind]
    unfused = {"qkv": lambda: rope_cache(F.linear(add_rmsnorm(x, norm, EPS, delta), weight), where, where, cos, cos,
                                         keys, values, heads),
               "residual": lambda: F.linear(x, weight),
               "gated": lambda: silu_mul(F.linear(add_rmsnorm(x, norm, EPS, delta), weight)),
               "norm": lambda: F.linear(add_rmsnorm(x, norm, EPS, delta), weight)}[kind]
    return fused, unfused, lambda: F.linear(x, weight)


def sweep(shape: str, counts: list[int], reps: int, quick: bool) -> list[dict]:
    """Every matrix at every M: bare cuBLAS, the unfused launches, the fused kernel at its default config and at
    each candidate. The best config per (kind, BLOCK_M, rows, size), over the M sharing that BLOCK_M, goes into
    `gemm_rows.TUNED` for the step measurements."""
    out = []
    for matrix, (rows, size) in layer_products(shape).items():
        kind = matrix.split("_")[0]
        weight_bytes = (2 if kind == "gated" else 1) * rows * size * 2
        totals: dict[int, dict[tuple, list[float]]] = {}  # BLOCK_M -> config -> ms at each of its M
        for count in counts:
            fused, unfused, bare = calls(shape, matrix, count)
            row = {"shape": shape, "kind": kind, "matrix": matrix, "rows": rows, "size": size, "m": count,
                   "cublas_ms": _kernel_ms(bare, reps), "unfused_ms": _kernel_ms(unfused, reps),
                   "default_config": list(rows_config(kind, count, rows, size)),
                   "default_ms": _kernel_ms(lambda: fused(None), reps)}
            timed = {}
            for config in candidates(quick):
                try:
                    timed[config] = _kernel_ms(lambda: fused(config), reps)
                except Exception as error:  # noqa: BLE001 - a config the compiler refuses (registers, shared memory)
                    say(f"  {shape} {matrix} M={count} {config}: {type(error).__name__}")
            bucket = totals.setdefault(block_rows(count), {})
            for config, ms in timed.items():
                bucket.setdefault(config, []).append(ms)
            best = min(timed, key=timed.get)
            row.update(best_config=list(best), best_ms=timed[best], weight_tb_s=weight_bytes / timed[best] / 1e9,
                       top={",".join(map(str, c)): round(ms * 1e3, 2)
                            for c, ms in sorted(timed.items(), key=lambda kv: kv[1])[:6]})
            say(f"{shape:4s} {matrix:13s} {rows:6d}x{size:<6d} M={count:2d} | cuBLAS bare {row['cublas_ms'] * 1e3:7.2f}"
                f" us | unfused {row['unfused_ms'] * 1e3:7.2f} us | fused default {row['default_ms'] * 1e3:7.2f} us"
                f" | best {best} {row['best_ms'] * 1e3:7.2f} us ({row['weight_tb_s']:.2f} TB/s) | unfused/best "
                f"{row['unfused_ms'] / row['best_ms']:.2f}x")
            out.append(row)
        for block_m, summed in totals.items():  # of the configs that ran at every M of the bucket
            needed = sum(block_rows(count) == block_m for count in counts)
            complete = {config: sum(times) for config, times in summed.items() if len(times) == needed}
            if complete:
                gemm_rows.TUNED[kind, block_m, rows, size] = min(complete, key=complete.get)
    return out


def steps(shape: str, counts: list[int], context: int, reps: int) -> dict:
    """NativeLlama's verify step (a chain of n - 1 drafted tokens: n queries) with the row GEMMs off and on, and the
    AR step (n = 1, the one-token GEMVs either way) for the ratio."""
    model = build_model(shape, "sdpa", DEVICE, DTYPE)
    vocab = SHAPES[shape][5]
    prompt = torch.randint(0, vocab, (context,)).tolist()
    out = {"shape": shape, "context": context, "floor_ms": weight_floor_ms(model)}
    for fused in (False, True):
        backend = NativeBackend(model, max_len=context + max(counts) + 8, buckets=(1, *counts))
        backend.native.rows_gemm = fused  # before the prefill: it captures the graphs
        backend.native.rows_max_queries = MAX_ROWS  # every T measured, past the default ROWS_MAX_QUERIES
        state = backend.prefill(prompt)
        label = "rows" if fused else "unfused"
        for n in (1, *counts):
            tree = DraftTree.chain(torch.randint(0, vocab, (n - 1,))).to(backend.device)

            def step():
                backend.score_tree(state, 7, tree)
                backend.commit(state, [], len(tree))
                state.length -= 1  # the root stays uncommitted: every repetition scores the same positions

            out[f"{label}_step{n}_ms"] = _median_ms(step, reps)
            if DEVICE == "cuda":
                out[f"{label}_graph{n}_ms"] = replay_ms(backend._steps[n, n].graph, reps)
        say(f"{shape} ctx {context} {label}: " + ", ".join(
            f"T={n} {out[f'{label}_step{n}_ms']:.3f}" + (f" (graph {out[f'{label}_graph{n}_ms']:.3f})"
                                                          if DEVICE == "cuda" else "")
            for n in (1, *counts)) + " ms")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    key = "graph" if DEVICE == "cuda" else "step"
    say(f"{shape}: unfused / rows per T: " + ", ".join(
        f"T={n} {out[f'unfused_{key}{n}_ms'] / out[f'rows_{key}{n}_ms']:.2f}x" for n in counts))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="1b,7b,zoo", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="rows (queries) per step, 2..64")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="five configs only")
    parser.add_argument("--no-sweep", action="store_true", help="the steps only, at the default configs")
    parser.add_argument("--no-steps", action="store_true", help="the kernel sweep only")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    say(name, torch.__version__)
    result = {"device": name, "dtype": str(DTYPE), "sweep": [], "steps": []}
    path = args.out / "gemm_rows_bench.json"
    for shape in shapes if not args.no_sweep else []:
        result["sweep"] += sweep(shape, counts, args.reps, args.quick)
        path.write_text(json.dumps(result, indent=1))
    tuned = [{"kind": k, "block_m": m, "rows": r, "size": n, "config": list(c)}
             for (k, m, r, n), c in sorted(gemm_rows.TUNED.items())]
    (args.out / "rows_tuned.json").write_text(json.dumps(tuned, indent=1))
    say("TUNED = {" + ", ".join(f"{key!r}: {value!r}" for key, value in sorted(gemm_rows.TUNED.items())) + "}")
    for shape in shapes if not args.no_steps else []:
        result["steps"].append(steps(shape, counts, args.context, args.reps))
        path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
