"""GPU measurement for the one-token step (issue 4): each kind of fused GEMV (qkv + rotary, o and down + residual,
gate/up + SiLU, lm head + norm) at the 1.1B / 7B / zoo shapes over a sweep of tile configs, against cuBLAS's bare
product at M = 1; then the native AR step with the cuBLAS path and with the GEMVs at the sweep's best configs (the
whole step as `bench-step` times it, and the bucket-1 graph's GPU time alone); `--profile` adds a kernel table.

    python3 evals/scripts/gemv_bench.py --out DIR [--shapes 1b,7b,zoo] [--quick] [--profile]

Writes DIR/gemv_bench.json and DIR/tuned.json (the best config per kind and shape: `kernels/gemv.py`'s TUNED
table, or SPECDEC_GEMV_TUNED=DIR/tuned.json for another GPU), printing as it goes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.evals.step_bench import (SHAPES, _kernel_ms, _median_ms, build_model, layer_products, replay_ms,
                                      weight_floor_ms)
from specdec.backends.native import NativeBackend
from specdec.kernels import gemv as gemv_mod
from specdec.kernels.gemv import gemv, gemv_gated, gemv_qkv_rope
from specdec.kernels.tree_attention import triton
from specdec.tree import DraftTree


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run under TRITON_INTERPRET=1


def say(*parts) -> None:
    print(*parts, flush=True)


def candidates(size: int, quick: bool) -> list[tuple[int, int, int, int]]:
    """Whole rows (one tile, stages irrelevant) and 512/1024-column chunks, 1-8 rows a program, 4 or 8 warps."""
    whole = triton.next_power_of_2(size)
    if quick:
        return [(4, min(whole, 1024), 4, 3), (4, whole, 4, 1)]
    configs = [(n, whole, w, 1) for n in (1, 2, 4, 8) for w in (4, 8) if n * whole <= 32768]
    return configs + [(n, k, w, s) for n in (2, 4, 8) for k in (512, 1024) if k < whole for w in (4, 8)
                      for s in (1, 3)]


def sweep(shape: str, reps: int, quick: bool) -> list[dict]:
    """Each kind of one-token GEMV at this shape: cuBLAS F.linear at M = 1 (the bare product, none of the fused
    ops) and specdec's kernel at every candidate config; the best goes into `TUNED` for the step measurements."""
    hidden, _, heads, kv_heads, _, _ = SHAPES[shape]
    head_dim = hidden // heads
    rows_out = []
    for name, (rows, size) in layer_products(shape).items():
        kind = name.split("_")[0]
        n = 2 * rows if kind == "gated" else rows
        weight = (torch.randn(n, size, device=DEVICE) * 0.02).to(torch.bfloat16)
        x = torch.randn(1, size, device=DEVICE, dtype=torch.bfloat16)
        norm = torch.ones(size, device=DEVICE, dtype=torch.bfloat16)
        stream = torch.zeros(1, rows, device=DEVICE, dtype=torch.bfloat16)
        cache = torch.zeros(kv_heads, 64, head_dim, device=DEVICE, dtype=torch.bfloat16)
        values = cache.clone()
        cos = torch.ones(64, head_dim, device=DEVICE, dtype=torch.bfloat16)
        where = torch.tensor([3], device=DEVICE)
        calls = {"qkv": lambda c: gemv_qkv_rope(x, weight, where, where, cos, cos, cache, values, heads, norm, 1e-5,
                                                config=c),
                 "residual": lambda c: gemv(x, weight, residual=stream, config=c),
                 "gated": lambda c: gemv_gated(x, weight, norm, 1e-5, config=c),
                 "norm": lambda c: gemv(x, weight, norm, 1e-5, config=c)}
        gbytes = n * size * 2 / 1e9
        row = {"shape": shape, "kind": kind, "matrix": name, "rows": n, "size": size,
               "cublas_ms": _kernel_ms(lambda: F.linear(x, weight), reps)}
        timed = {}
        for config in candidates(size, quick):
            try:
                timed[config] = _kernel_ms(lambda: calls[kind](config), reps)
            except Exception as error:  # noqa: BLE001 - a config the compiler refuses (registers, shared memory)
                say(f"  {shape} {name} {config}: {type(error).__name__}")
        best = min(timed, key=timed.get)
        gemv_mod.TUNED[kind, rows, size] = best
        row.update(best_config=list(best), best_ms=timed[best], best_tb_s=gbytes / timed[best],
                   cublas_tb_s=gbytes / row["cublas_ms"],
                   top={",".join(map(str, c)): round(ms * 1e3, 2) for c, ms in sorted(timed.items(),
                                                                                     key=lambda kv: kv[1])[:6]})
        say(f"{shape:4s} {name:14s} {n:6d}x{size:<6d} cuBLAS (bare) {row['cublas_ms'] * 1e3:7.2f} us "
            f"({row['cublas_tb_s']:.2f} TB/s) | fused best {best} {row['best_ms'] * 1e3:7.2f} us "
            f"({row['best_tb_s']:.2f} TB/s)")
        rows_out.append(row)
    return rows_out


def steps(shape: str, context: int, reps: int, profile: bool) -> dict:
    """The native AR step (and verify(64)) with and without the one-token GEMVs."""
    model = build_model(shape, "sdpa", DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    vocab = SHAPES[shape][5]
    out = {"shape": shape, "context": context, "floor_ms": weight_floor_ms(model)}
    for fused in (False, True):
        backend = NativeBackend(model, max_len=context + 72, buckets=(1, 64))
        backend.native.one_token_gemv = fused
        state = backend.prefill(torch.randint(0, vocab, (context,)).tolist())
        label = "gemv" if fused else "cublas"
        for n in (1, 64):
            tree = DraftTree.chain(torch.randint(0, vocab, (n - 1,))).to(backend.device)

            def step():
                backend.score_tree(state, 7, tree)
                backend.commit(state, [], len(tree))
                state.length -= 1

            out[f"{label}_step{n}_ms"] = _median_ms(step, reps)
        if DEVICE == "cpu":
            continue
        graph = backend._steps[1, 1].graph
        out[f"{label}_graph1_ms"] = replay_ms(graph, reps)
        say(f"{shape} ctx {context} {label}: step(1) {out[f'{label}_step1_ms']:.3f} ms, graph(1) GPU "
            f"{out[f'{label}_graph1_ms']:.3f} ms, step(64) {out[f'{label}_step64_ms']:.3f} ms, floor "
            f"{out['floor_ms']:.3f} ms")
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    graph.replay()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            say(table)
            out[f"{label}_profile"] = table
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="1b,7b,zoo")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a few configs only")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--profile", action="store_true", help="a kernel table of the AR step's graph")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    say(name, torch.__version__)
    result = {"device": name, "sweep": [], "steps": []}
    path = args.out / "gemv_bench.json"
    for shape in args.shapes.split(","):
        if not args.no_sweep:
            result["sweep"] += sweep(shape, args.reps, args.quick)
            path.write_text(json.dumps(result, indent=1))
    for shape in args.shapes.split(","):
        result["steps"].append(steps(shape, args.context, args.reps, profile=args.profile))
        path.write_text(json.dumps(result, indent=1))
    (args.out / "tuned.json").write_text(json.dumps(
        [{"kind": k, "rows": r, "size": n, "config": list(c)} for (k, r, n), c in sorted(gemv_mod.TUNED.items())]))
    say("TUNED = {" + ", ".join(f"{key!r}: {value!r}" for key, value in sorted(gemv_mod.TUNED.items())) + "}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
