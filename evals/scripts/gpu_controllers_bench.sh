#!/usr/bin/env bash
# Controllers against static budgets on the GPU: SmolLM2-135M-Instruct (real, GGUF from the registry), native
# backend, Spec-Bench, model-free drafters crossed with goodput / heuristic / tree_size / threshold, and a static
# sweep whose mixed-workload best is picked on a dev split. Carried and called as gpu_real_model_bench.sh
# (calls 1, 2: `stash` with .gguf_parts/smollm2.part00, then part01; call 3: `bench` with part02, .whl and .shared).
# LIMIT timed questions per category (default 4), DEV (dev questions per category, default 2), SWEEP (depths).
set -euo pipefail
source "$(dirname "$0")/gpu_smollm2_setup.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
methods=${METHODS:-ar,ngram,fused:drafters=copyspec+recycling,recycling,copyspec@goodput,retrieval@goodput}
set +e
specdec bench --target "$name" --backend native --data spec_bench --limit "${LIMIT:-4}" --dev-limit "${DEV-2}" \
  --warmup 2 --methods "$methods" \
  --controllers "${CONTROLLERS-goodput,heuristic,tree_size,threshold}" --static-sweep "${SWEEP-1,2,4,8,12}" \
  --max-new-tokens 128 --out "$out/controllers" 2>&1 | grep -v "━" | tail -60
echo "bench exit code ${PIPESTATUS[0]}"
rm -f "$out"/controllers/chart.png
cp -r "$SPECDEC_CACHE/costs" "$out/costs" 2>/dev/null || true
