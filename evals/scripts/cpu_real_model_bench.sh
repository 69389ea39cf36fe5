#!/usr/bin/env bash
# Real models on this CPU (2 cores), one `specdec bench` run per table, ar and the peers in the same run:
#   bash evals/scripts/cpu_real_model_bench.sh smollm2   # SmolLM2-135M-Instruct, Spec-Bench (LIMIT per category,
#                                                         # default 10), every model-free drafter, fused, hf, hf-lookup
#   bash evals/scripts/cpu_real_model_bench.sh qwen      # Qwen2.5-Coder-1.5B-Instruct target, the 0.5B as draft:
#                                                         # model chain / tree, hf-assisted (same draft), ngram,
#                                                         # hf-lookup, fused (model + ngram); held-out code + MT-bench
#                                                         # coding questions
# DTYPE (smollm2: float32, the 100%-identical check; qwen: bfloat16), OUT (default evals/results/cpu_real).
set -euo pipefail
stage=${1:?smollm2 or qwen}
out=${OUT:-evals/results/cpu_real}
mkdir -p "$out"
export HF_HUB_OFFLINE=1
case "$stage" in
smollm2)
  methods="ar,ngram,recycling,copyspec,retrieval,fused:drafters=copyspec+recycling,hf,hf-lookup"
  specdec bench --target smollm2-135m-instruct --dtype "${DTYPE:-float32}" --data spec_bench --limit "${LIMIT:-10}" \
    --methods "$methods" --max-new-tokens 128 --warmup 1 --out "$out/smollm2_specbench" 2>&1 | grep -v "━"
  ;;
qwen)
  draft=qwen2.5-coder-0.5b-instruct
  specdec models pull "$draft" >/dev/null
  python3 evals/scripts/code_questions.py "$out/qwen_code.jsonl" "${CODE:-4}" "${CODING:-4}"
  equal=${EQUAL_COST:-static:max_depth=7,max_nodes=15}
  methods="ar,model:path=$draft,mode=chain@$equal,model:path=$draft,mode=tree@$equal,hf-assisted"
  methods="$methods,model:path=$draft,mode=tree,cost_stop=True@$equal,ngram,hf-lookup"
  methods="$methods,fused:drafters=model:path=$draft+ngram"
  specdec bench --target qwen2.5-coder-1.5b-instruct --assistant "$draft" --dtype "${DTYPE:-bfloat16}" \
    --data "$out/qwen_code.jsonl" --methods "$methods" --max-new-tokens "${TOKENS:-96}" --warmup 1 \
    --out "$out/qwen_code" 2>&1 | grep -v "━"
  ;;
esac
