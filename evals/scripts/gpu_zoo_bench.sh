#!/usr/bin/env bash
# The zoo-target benchmark of issue 3 on a GPU (first run on the H100): build (or reuse) the zoo target, then `specdec bench` on the held-out code prompts
# and on Spec-Bench's questions, with ar (specdec's own AR baseline), hf, hf-lookup and ngram side by side.
# Run from the repo root on the device machine:  bash evals/scripts/gpu_zoo_bench.sh [build|bench|all]
# It expects the Spec-Bench questions under .shared/data/spec_bench/ (a copy of ../shared carried with the call).
set -euo pipefail
stage=${1:-all}
out=${OUT:-out}
export SPECDEC_CACHE=${SPECDEC_CACHE:-$PWD/out/cache} SPECDEC_SHARED=${SPECDEC_SHARED:-$PWD/.shared}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
preset=${PRESET:-gpu-100m}
mkdir -p out "$out"
if [ "$stage" != bench ]; then
  python3 -c "from specdec.train.pretrain import ensure_model; print(ensure_model('$preset'))"
  cp "$SPECDEC_CACHE/models/$preset/specdec_pretrain.json" "$out/pretrain_$preset.json"
fi
if [ "$stage" != build ]; then
  set +e
  specdec bench --target "zoo:$preset" --data code:20 --methods ar,ngram,hf,hf-lookup --max-new-tokens 128 \
    --runs 1 --out "$out/code" 2>&1 | tee out/code.log
  specdec bench --target "zoo:$preset" --data spec_bench --limit 4 --methods ar,ngram,hf,hf-lookup \
    --max-new-tokens 128 --out "$out/specbench" 2>&1 | tee out/specbench.log
fi
