"""Step costs of batched decoding on a GPU, on random-init Llama shapes (no model to carry): one call.

For each shape and batch size B: t_AR(B) = a batched plain step (`score` with empty trees, the argmax read),
t_verify(B, N) = a step scoring a chain of N drafted nodes in every row, a plain step within a run of 8 on the
device (`plain_run`; its tokens checked against the same steps one at a time), and the per-row commit of 3 accepted
nodes (a chain's, in place; and 3 nodes that move), each on the HF-module batched cache and (where the kernels run)
the native one (`specdec.batch_native`: per-row tree attention, a graph per width), whose logits are compared; and
HF's own batched step (one token per row through `DynamicCache`, as `generate` runs it) on the same prompts.
CUDA-synchronised wall time, median of REPS (env, default 20) after warm-up. Then a torch.profiler table of each
backend's t_AR(B_max) step: where the batched step's time goes. The issue's goal: t_verify(64, 8) <= 1.5 x t_AR(64)
on the 1.1B shape.

    python3 evals/scripts/batch_step_cost.py OUT_DIR [shapes: 1b,135m] [batch sizes: 1,16,64]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from specdec.batch import BatchedCache, BatchedStaticBackend
from specdec.batch_native import NativeBatchedBackend
from specdec.kernels.tree_attention import kernel_available
from specdec.tree import DraftTree

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "1b": (2048, 22, 32, 4, 5632, 32000),    # TinyLlama-1.1B
    "135m": (576, 30, 9, 3, 1536, 49152),    # SmolLM2-135M
    "tiny": (64, 2, 4, 2, 128, 512),         # a dry run of this script on a CPU
}
BACKENDS = {"hf": BatchedStaticBackend, "native": NativeBatchedBackend}  # HF's modules; the native forward + graphs
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPS, PROMPT = int(os.environ.get("REPS", 20)), (200, 400)


def model_of(shape: str) -> LlamaForCausalLM:
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=2048, torch_dtype="bfloat16")
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if DEVICE == "cuda" else torch.float32).eval()
    return model


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(REPS):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_step(model, prompts: list[list[int]]):
    """HF's batched decode step: left-padded prompts prefilled into a DynamicCache, then one token per row."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    step_mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=DEVICE)], 1)
    token = ids[:, -1:]

    def step():
        with torch.inference_mode():
            model(input_ids=token, attention_mask=step_mask, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # the same cache length every time (transformers 5: a negative count removes)

    return step


def main(out: str, shapes: str = "1b,135m", sizes: str = "1,16,64") -> None:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    lines = [f"{name} · torch {torch.__version__}"]
    generator = torch.Generator().manual_seed(0)
    for shape in shapes.split(","):
        model = model_of(shape)
        vocab = model.config.vocab_size
        for batch in map(int, sizes.split(",")):
            prompts = [torch.randint(vocab, (int(torch.randint(*PROMPT, (1,), generator=generator)),),
                                     generator=generator).tolist() for _ in range(batch)]
            hf = timed(hf_step(model, prompts))
            roots = [p[-1] for p in prompts]
            chains = {nodes: [DraftTree.chain(list(range(1, nodes + 1))) if nodes else DraftTree.empty()] * batch
                      for nodes in (0, 3, 7, 15)}
            scored = {}
            for kind, make in BACKENDS.items():
                if kind == "native" and not kernel_available(torch.device(DEVICE)):
                    continue
                backend = make(model, batch, max_len=1024)
                for row, prompt in enumerate(prompts):
                    backend.prefill_row(row, prompt[:-1])
                try:
                    costs = {nodes: timed(lambda: backend.score(roots, trees, argmax=True))
                             for nodes, trees in chains.items()}
                except Exception:  # noqa: BLE001 - a failing backend is reported; the others still measure
                    lines.append(f"{shape} B={batch} {kind}: FAILED\n{traceback.format_exc()}")
                    print(lines[-1], flush=True)
                    continue
                scored[kind] = backend.score(roots, chains[7])

                def undone(action):
                    def run():
                        lengths = list(backend.lengths)
                        result = action()
                        backend.lengths = lengths
                        return result
                    return run

                in_place = timed(undone(lambda: backend.commit([[0, 1, 2]] * batch)))  # a chain's: nothing moves
                moved = timed(undone(lambda: backend.commit([[1, 2, 3]] * batch)))  # 3 nodes moved in every row
                run = timed(undone(lambda: backend.plain_run(roots, 8))) / 8
                ran = undone(lambda: backend.plain_run(roots, 8))()  # its tokens against 8 steps one at a time
                stepped = undone(lambda: BatchedCache.plain_run(backend, roots, 8))()
                same_run = sum(a == b for a, b in zip(ran, stepped))
                ar = costs[0]
                lines.append(f"{shape} B={batch:3d} {kind:6s}: t_AR {1e3 * ar:7.2f} ms (in a plain run of 8: "
                             f"{1e3 * run:7.2f}; its tokens = one step at a time in {same_run}/{batch} rows) | "
                             f"t_verify N=3 "
                             f"{1e3 * costs[3]:7.2f} ({costs[3] / ar:.2f}x) N=7 {1e3 * costs[7]:7.2f} "
                             f"({costs[7] / ar:.2f}x) N=15 {1e3 * costs[15]:7.2f} ({costs[15] / ar:.2f}x) | commit "
                             f"chain {1e3 * in_place:6.2f} ms, moved {1e3 * moved:6.2f} ms | HF step {1e3 * hf:7.2f} "
                             f"ms (ours {ar / hf:.2f}x HF's)")
                print(lines[-1], flush=True)
                del backend
            if len(scored) == 2:  # the two forwards agree (bf16: rounding apart)
                gap = max((a.float() - b.float()).abs().max().item() for a, b in zip(*scored.values()))
                same = sum(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(*scored.values()))
                lines.append(f"{shape} B={batch:3d} native vs hf logits: max |diff| {gap:.3g}, "
                             f"{same}/{batch} rows with every argmax equal")
                print(lines[-1], flush=True)
        from torch.profiler import ProfilerActivity, profile

        trees = [DraftTree.empty()] * batch
        for kind in scored:  # the backends that ran, at the largest batch
            backend = BACKENDS[kind](model, batch, max_len=1024)
            for row, prompt in enumerate(prompts):
                backend.prefill_row(row, prompt[:-1])
            for _ in range(3):
                backend.score(roots, trees, argmax=True)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(5):
                    backend.score(roots, trees, argmax=True)
                sync()
            for key in ("self_cuda_time_total", "self_cpu_time_total")[0 if DEVICE == "cuda" else 1:]:
                table = prof.key_averages().table(sort_by=key, row_limit=15)
                lines.append(f"\n{shape} B={batch} {kind} t_AR step x5, by {key}:\n{table}")
            del backend
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "batch_step_cost.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main(*sys.argv[1:])
