#!/usr/bin/env bash
# Model-free drafters on a GPU (first run on the H100 for issue 5): side by side on the zoo target (code prompts and two-turn rewrites).
#   bash evals/scripts/gpu_drafters_bench.sh build   # zoo target + retrieval datastore (cached under out/)
#   bash evals/scripts/gpu_drafters_bench.sh bench   # BACKEND=native: on the fast path (default: hf)
set -euo pipefail
stage=${1:-all}
source "$(dirname "$0")/device_env.sh"
preset=${PRESET:-gpu-100m}
store=$PWD/out/cache/$preset-train.sdds
if [ "$stage" != bench ]; then
  python3 evals/scripts/zoo_datastore.py "$preset" "$store" 30000000
fi
if [ "$stage" != build ]; then
  methods="ar,ngram,recycling,copyspec,retrieval:datastore=$store,fused:drafters=copyspec+recycling,hf-lookup"
  set +e
  flags=(--backend "${BACKEND:-hf}" --warmup "${WARMUP:-3}" --methods "$methods" --max-new-tokens 128)
  specdec bench --target "zoo:$preset" --data code:20 "${flags[@]}" --out "$out/code" 2>&1 | grep -v "━" | tail -25
  specdec bench --target "zoo:$preset" --data code-rewrite:10 "${flags[@]}" --out "$out/rewrite" 2>&1 \
    | grep -v "━" | tail -25
  rm -f "$out"/*/chart.png "$out"/*/results.json.tmp
fi
