#!/usr/bin/env bash
# The fast path on a GPU (issue 4, and the issue-3 tables; first run on the H100), one device call per stage:
#   bash evals/scripts/gpu_fast_path.sh check   # GPU equality checks at real sizes + `specdec bench-step` (~6 min)
#   bash evals/scripts/gpu_fast_path.sh compile # bench-step with torch.compile before capture, context 2k
#   bash evals/scripts/gpu_fast_path.sh build   # the zoo target (~7 min)
#   bash evals/scripts/gpu_fast_path.sh bench   # `specdec bench` on the native, graph and hf backends, code +
#                                                # Spec-Bench (BACKENDS, METHODS choose)
# Spec-Bench's questions are expected under .shared/data/spec_bench/ (a copy of ../shared carried with the call).
set -uo pipefail
stage=${1:?check, compile, build or bench}
source "$(dirname "$0")/device_env.sh"
preset=${PRESET:-gpu-100m}
case "$stage" in
check)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 evals/scripts/gpu_check.py "$out/gpu_check.txt" 2>&1 | grep -v "^PASS tree_attention"
  paths=${PATHS:-eager@hf,sdpa@hf,specdec_tree@hf,sdpa@graph,specdec_tree@graph,specdec_tree@native}
  specdec bench-step --shapes "${SHAPES:-1b,7b}" --paths "$paths" --contexts 512,2048,8192 \
    --sizes "${SIZES:-1,2,4,8,16,32,64,128,256}" --reps "${REPS:-20}" --out "$out/step" 2>&1
  ;;
compile)
  # kernel fusion by torch.compile before capture: compiles once per (bucket, context), so few of them
  specdec bench-step --shapes "${SHAPES:-1b,7b}" --paths specdec_tree@graph,specdec_tree@graph+compile \
    --contexts 2048 --sizes 1,16,64 --reps 20 --kernel-contexts 4096,16384 --out "$out/compile" 2>&1
  ;;
build)
  python3 -c "from specdec.train.pretrain import ensure_model; print(ensure_model('$preset'))" 2>&1 | tail -5
  ;;
bench)
  methods=${METHODS:-ar,ngram,fused:drafters=copyspec+recycling,hf,hf-lookup}  # hf-static: HF recompiles per cache size
  for backend in ${BACKENDS:-native graph hf}; do
    specdec bench --target "zoo:$preset" --backend "$backend" --data code:20 --warmup 3 --methods "$methods" \
      --max-new-tokens 128 --out "$out/code_$backend" 2>&1 | grep -E -i "lossless|mismatch|error|│ "
    if [ "$backend" != hf ]; then
      specdec bench --target "zoo:$preset" --backend "$backend" --data spec_bench --limit 4 --warmup 3 \
        --methods "$methods" \
        --max-new-tokens 128 --out "$out/specbench_$backend" 2>&1 | grep -E -i "lossless|mismatch|error|│ "
      rm -f "$out/specbench_$backend/chart.png"
    else
      rm -f "$out/code_$backend/chart.png"
    fi
  done
  ;;
*)
  echo "unknown stage $stage" >&2; exit 2 ;;
esac
