"""`specdec bench-step`: what one target step costs, as a function of the tokens it scores.

For random-init models of real shapes (timing does not depend on weight values; random, never zero, weights), in
bf16 on the GPU: t_AR (one token) and t_verify(n) (a chain of n-1 drafted tokens below the root, so n queries) at
several context lengths, for each path = attention implementation (HF eager, HF sdpa, specdec's Triton
`specdec_tree`) @ backend (`hf`: DynamicCache in eager Python; `graph`: static cache, each step a CUDA graph;
`graph+compile`: the same with each step's forward compiled by torch.compile before capture; `native`: the
graph backend with specdec's own Llama forward, `specdec_tree@native`; on the graph and native backends also
`<path> ar-chain8`: greedy AR per token in chains of 8 one-token steps per host round trip in one graph, and
`<path> ar-stream8`: as `reference_decode` runs it there, those chains pipelined, 64 tokens); the ratios of the
fast path's goals (t_AR / bandwidth floor, t_verify(64) / t_AR); and the
attention kernel alone: `tree_attention` vs PyTorch SDPA with the float tree mask (which loses the flash kernel) vs
SDPA causal at n = 1, with the achieved bandwidth of the KV read -- GPU time from CUDA events around a CUDA graph
of 10 calls, so the launchers' host overhead (~0.15 ms for a Triton launch from Python) is not what is measured.

    specdec bench-step --shapes 1b,7b --contexts 512,2048,8192 --sizes 1,4,16,64,128,256 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from specdec.backends.graph import GraphBackend
from specdec.backends.hf import HFBackend, tree_attention_mask
from specdec.backends.native import NativeBackend
from specdec.reference import AR_CHAIN
from specdec.tree import DraftTree

console = Console(stderr=True)

SHAPES = {  # hidden, layers, q heads, kv heads, ffn, vocab
    "1b": (2048, 22, 32, 4, 5632, 32000),     # TinyLlama-1.1B
    "7b": (4096, 32, 32, 32, 11008, 32000),   # Llama-2-7B
    "zoo": (768, 16, 12, 4, 2048, 8192),      # zoo:gpu-100m, the benchmark target (profiles)
    "tiny": (64, 2, 4, 2, 128, 512),          # CPU smoke test
}


@dataclass(frozen=True)
class StepTiming:
    shape: str
    attn: str
    context: int
    tokens: int  # queries scored in the step: the root + tokens - 1 drafted nodes
    ms: float


def build_model(shape: str, attn: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, ffn, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=16384)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    set_attention(model, attn)
    return model


def set_attention(model, attn: str) -> None:
    if attn == "specdec_tree":
        from specdec.kernels.tree_attention import register_tree_attention

        register_tree_attention()
    model.set_attn_implementation(attn)


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, GPU-synchronised, after `warmup` warm-up calls."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _kernel_ms(fn, reps: int, calls: int = 10) -> float:
    """GPU time of one fn() call in ms: `calls` calls captured in one CUDA graph, replayed `reps` times between CUDA
    events (median), so the Python launcher's overhead is not counted. Off CUDA: `_median_ms`."""
    if not torch.cuda.is_available():
        return _median_ms(fn, reps)
    for _ in range(2):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return replay_ms(graph, reps) / calls


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """GPU time of one replay of a captured graph in ms: the median of `reps`, between CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_costs(model, shape: str, path: str, contexts: list[int], sizes: list[int], reps: int,
               warmup: int = 2) -> list[StepTiming]:
    """t_verify(n) through a backend ("hf"; "graph": static cache + CUDA graphs of the sizes measured; "native": the
    same with specdec's own forward): score a chain of n-1 nodes, then drop it again (the cache keeps its length).
    n = 1 is the AR step. Each timing: the median of `reps` after `warmup` untimed calls."""
    backend_name, _, option = path.split("@")[1].partition("+")
    vocab = model.get_output_embeddings().weight.shape[0]
    out = []
    for context in contexts:
        if backend_name == "graph":
            backend = GraphBackend(model, max_len=context + max(sizes) + 8, buckets=sizes, attention=None,
                                   compile=option == "compile")
        elif backend_name == "native":
            backend = NativeBackend(model, max_len=context + max(sizes) + 8, buckets=sizes)
        else:
            backend = HFBackend(model)
        state = backend.prefill(torch.randint(0, vocab, (context,)).tolist())
        for n in sizes:
            tree = DraftTree.chain(torch.randint(0, vocab, (n - 1,))).to(backend.device)

            def step():
                backend.score_tree(state, 7, tree)
                backend.commit(state, [], len(tree))
                state.length -= 1  # the root stays uncommitted: every repetition scores the same positions
                if backend_name == "hf":
                    state.cache.crop(-1)

            out.append(StepTiming(shape, path, context, n, _median_ms(step, reps, warmup)))
        if hasattr(backend, "greedy_decode") and 1 in backend.buckets:
            def chain():  # greedy AR, AR_CHAIN tokens per host round trip
                backend.greedy_decode(state, 7, AR_CHAIN)
                state.length -= AR_CHAIN

            streamed = min(8 * AR_CHAIN, backend.max_len - state.length)

            def stream():  # as `reference_decode` runs it here: the chains pipelined
                for _ in backend.greedy_stream(state, 7, AR_CHAIN, streamed):
                    pass
                state.length -= streamed

            out.append(StepTiming(shape, f"{path} ar-chain{AR_CHAIN}", context, 1,
                                  _median_ms(chain, reps, warmup) / AR_CHAIN))
            out.append(StepTiming(shape, f"{path} ar-stream{AR_CHAIN}", context, 1,
                                  _median_ms(stream, reps, warmup) / streamed))
    return out


def kernel_costs(shape: str, contexts: list[int], sizes: list[int], reps: int, device: str,
                 dtype: torch.dtype) -> list[dict]:
    """The attention of one layer alone: specdec's kernel vs SDPA with the float tree mask vs SDPA causal (n=1)."""
    from specdec.kernels.tree_attention import tree_attention

    _, _, heads, kv_heads, _, _ = SHAPES[shape]
    head_dim = SHAPES[shape][0] // heads
    rows = []
    for context in contexts:
        for n in sizes:
            q = torch.randn(1, heads, n, head_dim, device=device, dtype=dtype)
            k = torch.randn(1, kv_heads, context + n, head_dim, device=device, dtype=dtype)
            v = torch.randn_like(k)
            tree = DraftTree.chain(torch.zeros(n - 1, dtype=torch.long))
            mask = tree_attention_mask(tree, context, dtype, torch.device(device))
            tree_mask = mask[0, 0, :, context:] == 0
            groups = heads // kv_heads
            k_rep, v_rep = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            row = {"context": context, "tokens": n,
                   "kernel_ms": _kernel_ms(lambda: tree_attention(q, k, v, tree_mask), reps),
                   "sdpa_mask_ms": _kernel_ms(lambda: sdpa(q, k_rep, v_rep, attn_mask=mask), reps)}
            if n == 1:
                row["sdpa_causal_ms"] = _kernel_ms(lambda: sdpa(q, k_rep, v_rep), reps)
            kv_bytes = 2 * k.numel() * k.element_size()
            row["kernel_tb_s"] = kv_bytes / (row["kernel_ms"] * 1e-3) / 1e12
            rows.append(row)
    return rows


def layer_products(shape: str) -> dict[str, tuple[int, int]]:
    """The native forward's fused products at a SHAPES shape: kind -> (output rows, as the GEMV and row-GEMM config
    tables count them (gated: I), input size)."""
    hidden, _, heads, kv_heads, ffn, vocab = SHAPES[shape]
    head_dim = hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "residual_o": (hidden, hidden),
            "gated": (ffn, hidden), "residual_down": (hidden, ffn), "norm_head": (vocab, hidden)}


H100_COPY_RATE = 3.0e12  # bytes/s (read + write) of a device-to-device copy, measured on the H100 of earlier reports


def copy_rate(device: str) -> float:
    """Bytes/s (read + write) of a 1 GiB device-to-device copy, median of 10 after warm-up: the memory floor's rate
    on this GPU (H100 80GB HBM3 here: 3.0e12; H200: 4.2e12). Off CUDA: the H100's, for the table's sake."""
    if device != "cuda":
        return H100_COPY_RATE
    source = torch.randn(2 ** 29, device=device)
    target = torch.empty_like(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(13):
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.numel() * source.element_size() / statistics.median(times[3:])


def weight_floor_ms(model, rate: float = H100_COPY_RATE) -> float:
    """Weight bytes / the copy rate: the batch-1 step's memory floor."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / rate * 1e3


def _table(timings: list[StepTiming], floors: dict[str, float], rate: float) -> Table:
    table = Table(title=f"t_verify(n) in ms (n = 1 is the AR step); floor = weights / {rate / 1e12:.2f} TB/s (this "
                        f"GPU's copy rate)")
    for column in ("shape", "attn@backend", "context", "floor", *sorted({t.tokens for t in timings})):
        table.add_column(str(column), justify="right")
    keys = sorted({(t.shape, t.attn, t.context) for t in timings})
    for shape, attn, context in keys:
        cells = {t.tokens: t.ms for t in timings if (t.shape, t.attn, t.context) == (shape, attn, context)}
        table.add_row(shape, attn, str(context), f"{floors[shape]:.2f}", *(f"{cells[n]:.2f}" for n in sorted(cells)))
    return table


def goal_ratios(timings: list[StepTiming], floors: dict[str, float], context: int = 2048) -> list[dict]:
    """Per shape and path, at `context` (or the nearest measured): t_AR / floor and t_verify(64) / t_AR."""
    rows = []
    for shape, path in sorted({(t.shape, t.attn) for t in timings}):
        mine = [t for t in timings if (t.shape, t.attn) == (shape, path)]
        nearest = min({t.context for t in mine}, key=lambda c: abs(c - context))
        cells = {t.tokens: t.ms for t in mine if t.context == nearest}
        if 1 not in cells:
            continue
        row = {"shape": shape, "path": path, "context": nearest, "t_ar_ms": cells[1],
               "ar_over_floor": cells[1] / floors[shape]}
        if 64 in cells:
            row["verify64_over_ar"] = cells[64] / cells[1]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec bench-step", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="1b,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--paths", default="eager@hf,sdpa@hf,specdec_tree@hf,sdpa@graph,specdec_tree@graph",
                        help="attention implementation @ backend (hf: DynamicCache; graph: static cache + CUDA "
                             "graphs, the fast path; graph+compile: the same after torch.compile)")
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256", help="queries per step (root + nodes)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each step's timed ones")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernel-contexts", default="4096,8192,16384,32768")
    parser.add_argument("--out", type=Path, default=None, help="write step_bench.json here")


def run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    timings, floors, kernels = [], {}, {}
    rate = copy_rate(device)
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        model = build_model(shape, "sdpa", device, dtype)
        floors[shape] = weight_floor_ms(model, rate)
        for path in args.paths.split(","):
            attn, _, backend = path.partition("@")
            if backend not in ("hf", "graph", "graph+compile", "native"):
                raise ValueError(f"path {path!r}: expected <attention>@hf, <attention>@graph, "
                                 f"<attention>@graph+compile or specdec_tree@native")
            set_attention(model, attn)
            timings += step_costs(model, shape, path, ints(args.contexts), ints(args.sizes), args.reps, args.warmup)
            if device == "cuda":
                torch.cuda.empty_cache()
        del model
        if ints(args.kernel_contexts):  # "" skips the kernel-alone rows
            kernels[shape] = kernel_costs(shape, ints(args.kernel_contexts), [1, 16, 64], args.reps, device, dtype)
    console.print(_table(timings, floors, rate))
    goals = goal_ratios(timings, floors)
    for row in goals:
        console.print(f"{row['shape']} {row['path']} @ {row['context']}: t_AR {row['t_ar_ms']:.2f} ms = "
                      f"{row['ar_over_floor']:.2f}x floor" + (f"; t_verify(64) / t_AR = {row['verify64_over_ar']:.2f}"
                                                              if "verify64_over_ar" in row else ""))
    for shape, rows in kernels.items():
        console.print(f"[bold]{shape}[/] attention alone (ms): " + "; ".join(
            f"P={r['context']} n={r['tokens']}: kernel {r['kernel_ms']:.3f} ({r['kernel_tb_s']:.2f} TB/s) vs "
            f"sdpa+mask {r['sdpa_mask_ms']:.3f}" + (f", sdpa causal {r['sdpa_causal_ms']:.3f}"
                                                     if "sdpa_causal_ms" in r else "") for r in rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_bench.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
             "copy_rate_tb_s": rate / 1e12, "floors_ms": floors, "steps": [t.__dict__ for t in timings], "goals": goals,
             "kernels": kernels}, indent=1))
    return 0
