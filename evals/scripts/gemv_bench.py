"""GPU measurement for the one-token step (issue 4): specdec's GEMV kernels vs cuBLAS at the 1.1B / 7B / zoo
matrix shapes over a sweep of tile configs, then the native AR step with and without them (the whole step as
`bench-step` times it, and the bucket-1 graph's GPU time alone), and a kernel-level profile of one AR step.

    python3 evals/scripts/gemv_bench.py --out DIR [--shapes 1b,7b,zoo] [--quick]

Writes DIR/gemv_bench.json and prints as it goes (a closed pipe loses nothing already written).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.evals.step_bench import SHAPES, _kernel_ms, _median_ms, build_model, weight_floor_ms
from specdec.backends.native import NativeBackend
from specdec.kernels.gemv import gemv, gemv_config, gemv_gated, gemv_qkv_rope
from specdec.tree import DraftTree


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run under TRITON_INTERPRET=1


def say(*parts) -> None:
    print(*parts, flush=True)


def matrices(shape: str) -> dict[str, tuple[int, int]]:
    hidden, _, heads, kv_heads, ffn, vocab = SHAPES[shape]
    head_dim = hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, hidden), "gate_up": (2 * ffn, hidden),
            "down": (hidden, ffn), "head": (vocab, hidden)}


def sweep(shape: str, configs: list[tuple[int, int, int, int]], reps: int) -> list[dict]:
    """Each matrix: cuBLAS F.linear at M=1, plain `gemv` at every config, the fused variant at the best one."""
    hidden, _, heads, kv_heads, _, _ = SHAPES[shape]
    head_dim = hidden // heads
    rows = []
    for name, (n, k) in matrices(shape).items():
        weight = (torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        norm = torch.ones(k, device=DEVICE, dtype=torch.bfloat16)
        gbytes = n * k * 2 / 1e9
        row = {"shape": shape, "matrix": name, "n": n, "k": k, "cublas_ms": _kernel_ms(lambda: F.linear(x, weight),
                                                                                          reps)}
        row["cublas_tb_s"] = gbytes / row["cublas_ms"]
        timed = {}
        for config in configs:
            try:
                timed[config] = _kernel_ms(lambda: gemv(x, weight, config=config), reps)
            except Exception as error:  # noqa: BLE001 - a config the compiler refuses (registers, shared memory)
                say(f"  {shape} {name} {config}: {type(error).__name__}")
        best = min(timed, key=timed.get)
        row.update(best_config=list(best), gemv_ms=timed[best], gemv_tb_s=gbytes / timed[best],
                   default_config=list(gemv_config(n, k)), default_ms=timed.get(gemv_config(n, k)),
                   all={",".join(map(str, c)): round(ms * 1e3, 2) for c, ms in sorted(timed.items(),
                                                                                     key=lambda kv: kv[1])[:8]})
        if name == "gate_up":
            row["fused_ms"] = _kernel_ms(lambda: gemv_gated(x, weight, norm, 1e-5, config=best), reps)
        elif name == "qkv":
            cache = torch.zeros(kv_heads, 64, head_dim, device=DEVICE, dtype=torch.bfloat16)
            cos = torch.ones(64, head_dim, device=DEVICE, dtype=torch.bfloat16)
            where = torch.tensor([3], device=DEVICE)
            row["fused_ms"] = _kernel_ms(lambda: gemv_qkv_rope(x, weight, where, where, cos, cos, cache,
                                                               cache.clone(), heads, norm, 1e-5, config=best), reps)
        elif name in ("o", "down"):
            stream = torch.zeros(1, n, device=DEVICE, dtype=torch.bfloat16)
            row["fused_ms"] = _kernel_ms(lambda: gemv(x, weight, residual=stream, config=best), reps)
        else:
            row["fused_ms"] = _kernel_ms(lambda: gemv(x, weight, norm, 1e-5, config=best), reps)
        say(f"{shape:4s} {name:8s} {n:6d}x{k:<6d} cuBLAS {row['cublas_ms'] * 1e3:7.2f} us "
            f"({row['cublas_tb_s']:.2f} TB/s) | gemv best {best} {row['gemv_ms'] * 1e3:7.2f} us "
            f"({row['gemv_tb_s']:.2f} TB/s) default {(row['default_ms'] or float('nan')) * 1e3:.2f} us | "
            f"fused {row['fused_ms'] * 1e3:7.2f} us")
        rows.append(row)
    return rows


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
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        out[f"{label}_graph1_ms"] = sorted(times)[len(times) // 2]
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
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    say(name, torch.__version__)
    if args.quick:
        configs = [(16, 512, 4, 3), (8, 512, 4, 3), (32, 256, 4, 3)]
    else:
        configs = list(itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 3, 5)))
    result = {"device": name, "sweep": [], "steps": []}
    path = args.out / "gemv_bench.json"
    for shape in args.shapes.split(","):
        if not args.no_sweep:
            result["sweep"] += sweep(shape, configs, args.reps)
            path.write_text(json.dumps(result, indent=1))
    for shape in args.shapes.split(","):
        result["steps"].append(steps(shape, args.context, args.reps, profile=shape != "7b"))
        path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
