#!/usr/bin/env bash
# SmolLM2-135M-Instruct (a real chat model, GGUF from the registry) on the native backend, Spec-Bench, every
# model-free drafter and an early-exit head, with hf-static (HF's fastest batch-1 path) and hf-lookup as peers.
# A device call carries 64 MiB, checkout included (~18 MB), and the GGUF is 98 MB, so it travels in three parts on one
# warm machine:
#   here:   split -n 3 -d "$(specdec models path smollm2-135m-instruct --gguf)" .gguf_parts/smollm2.part
#           pip download --no-deps -d .whl gguf==0.19.0        (the device image has no `gguf`)
#   calls 1, 2: carry .gguf_parts/smollm2.part00, then part01 -> bash evals/scripts/gpu_real_model_bench.sh stash
#   call 3: carry .gguf_parts/smollm2.part02, .whl and .shared (a copy of ../shared/data/spec_bench)
#           -> bash evals/scripts/gpu_real_model_bench.sh bench
# LIMIT questions per Spec-Bench category (default 6), EXIT_LAYER (default 8; 0 = no early-exit head).
set -euo pipefail
source "$(dirname "$0")/gpu_smollm2_setup.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
methods="ar,ngram,recycling,copyspec,retrieval,fused:drafters=copyspec+recycling"
layer=${EXIT_LAYER:-8}
work=out/exit && mkdir -p "$work"
if [ "$layer" != 0 ] && [ ! -f "$work/head.safetensors" ]; then
  python3 evals/scripts/self_text.py "$name" "$work/self.txt" 256 192 | tee "$out/exit_head.log"
  specdec train early-exit --target "$name" --layer "$layer" --kind mlp --data "$work/self.txt" \
    --out "$work/head.safetensors" --steps "${EE_STEPS:-1200}" --batch-size 16 --seq-len 256 --lr 2e-3 2>&1 \
    | grep -v "━" | tail -5 | tee -a "$out/exit_head.log"
fi
[ "$layer" != 0 ] && methods="$methods,early_exit:head=$work/head.safetensors,mode=tree,graphs=True"
set +e
specdec bench --target "$name" --backend native --data spec_bench --limit "${LIMIT:-6}" --warmup 2 \
  --methods "$methods,hf-static,hf-lookup" --max-new-tokens 128 --out "$out/specbench" 2>&1 | grep -v "━" | tail -40
echo "bench exit code ${PIPESTATUS[0]}"
rm -f "$out"/specbench/chart.png
