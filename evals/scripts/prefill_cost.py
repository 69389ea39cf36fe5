"""What starting a row costs in batched decoding: `prefill_rows` of one row (and of several) on the native batched
cache, against the single-sequence native backend's prefill (graph chunks) and the HF-module batched cache, on the
SmolLM2-135M shape (random init: nothing to carry). The H100 batch bench spent 19 ms a row start (42-67% of its
wall time at batch 4-16) where the row's plain steps cost ~1 ms a token.

Per prompt length L: CUDA-synchronised wall time (median of REPS after warm-up) of
    native-rows padded  NativeBatchedBackend.prefill_rows(row, [L - 1 tokens]) as one eager forward, a (1, W, W) mask
    native-rows     the same through the single-sequence backend's graph chunks, the KV copied in (on CUDA)
    native-rows x4  four rows of length L at once
    hf-rows         BatchedStaticBackend.prefill_rows (HF's modules, SDPA)
    native-single   NativeBackend.prefill (the single-sequence path: square graph chunks)
and the host part of native-rows (its inputs built, no forward); timed as `batch_step_cost.py` times (REPS, default
20). Then a torch.profiler table of one native-rows prefill: where the time goes.

    python3 evals/scripts/prefill_cost.py OUT_DIR [lengths: 40,100,200,400,770]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from batch_step_cost import DEVICE, REPS, model_of, sync, timed  # this folder's step-cost script: its timing helpers
from specdec.backends.native import native_backend
from specdec.batch import BatchedStaticBackend
from specdec.batch_native import NativeBatchedBackend


def main(out: str, lengths: str = "40,100,200,400,770") -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    model = model_of("135m" if DEVICE == "cuda" else "tiny")  # (a dry run of this script on a CPU: tiny)
    generator = torch.Generator().manual_seed(0)
    lines = [f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'} · torch {torch.__version__} · "
             f"SmolLM2-135M shape, random init, ms (median of {REPS})"]
    rows = NativeBatchedBackend(model, 16, max_len=1024)
    hf_rows = BatchedStaticBackend(model, 16, max_len=1024)
    single = native_backend(model, max_len=1024)
    for length in map(int, lengths.split(",")):
        prompt = torch.randint(model.config.vocab_size, (length,), generator=generator).tolist()
        four = [prompt] * 4
        rows.prefill_single = False
        padded = timed(lambda: rows.prefill_rows(3, [prompt[:-1]]))
        rows.prefill_single = DEVICE == "cuda"
        costs = {
            "native-rows padded": padded,
            "native-rows": timed(lambda: rows.prefill_rows(3, [prompt[:-1]])),
            "native-rows x4": timed(lambda: rows.prefill_rows(4, [p[:-1] for p in four])),
            "hf-rows": timed(lambda: hf_rows.prefill_rows(3, [prompt[:-1]])),
            "native-single": timed(lambda: single.prefill(prompt[:-1])),
            "host inputs": timed(lambda: rows._prefill_inputs(3, [prompt[:-1]])),
        }
        lines.append(f"L={length:4d}: " + " | ".join(f"{name} {1e3 * s:7.2f}" for name, s in costs.items()))
        print(lines[-1], flush=True)
    if DEVICE == "cuda":
        prompt = torch.randint(model.config.vocab_size, (200,), generator=generator).tolist()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(3):
                rows.prefill_rows(3, [prompt[:-1]])
            sync()
        for sort in ("cuda_time_total", "cpu_time_total"):
            lines.append(f"\nprofile of 3 native-rows prefills, L=200, by {sort}:\n"
                         + profile.key_averages().table(sort_by=sort, row_limit=25))
    (Path(out) / "prefill_cost.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main(*sys.argv[1:])
