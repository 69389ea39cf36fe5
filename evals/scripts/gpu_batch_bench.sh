#!/usr/bin/env bash
# Batched decoding on the GPU: SmolLM2-135M-Instruct (GGUF from the registry), Spec-Bench prompts of mixed lengths,
# bf16, on the native batched cache (per-row tree attention, a graph per step width; BACKEND=hf: HF's modules).
# Methods (METHODS): batched `ar` (the baseline at each size), `ngram` under the batch gate and allocator,
# `ngram#whole` (no allocation), HF's batched `generate` with a dynamic (`hf`) and a static, compiled cache
# (`hf-static`) as the peers. Carried as gpu_real_model_bench.sh says (stash calls, then `bench`). LIMIT questions
# per category (default 3), SIZES (default 1,4,16), TOKENS new tokens (default 64), RUNS timed runs of each method in
# turn, the median reported (default 3: at tens of prompts the wall time varies by tens of percent).
set -euo pipefail
source "$(dirname "$0")/gpu_smollm2_setup.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
set +e
specdec bench --target "$name" --backend "${BACKEND:-native}" --data spec_bench --limit "${LIMIT:-3}" --batch-size "${SIZES:-1,4,16}" \
  --methods "${METHODS:-ar,ngram,ngram#whole,hf,hf-static}" --max-new-tokens "${TOKENS:-64}" --runs "${RUNS:-3}" --out "$out/batch" 2>&1 \
  | grep -v "━" | tail -40
echo "bench exit code ${PIPESTATUS[0]}"
