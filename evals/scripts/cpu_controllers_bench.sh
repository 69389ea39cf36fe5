#!/usr/bin/env bash
# Controllers against static budgets on this CPU, one `specdec bench` run per table, ar in the same run:
#   bash evals/scripts/cpu_controllers_bench.sh smollm2   # SmolLM2-135M-Instruct, Spec-Bench (LIMIT per category,
#                                                          # default 2; DEV more for the static pick, default 1),
#                                                          # ngram and fused x goodput / heuristic + a static sweep
#   bash evals/scripts/cpu_controllers_bench.sh head      # train the SpecDec++ acceptance head of the Qwen pair on
#                                                          # teacher-forced stdlib code (asyncio), held-out ECE
#   bash evals/scripts/cpu_controllers_bench.sh qwen      # Qwen2.5-Coder-1.5B-Instruct with its 0.5B draft: model
#                                                          # chain x goodput / threshold / acceptance_head / heuristic
#                                                          # + a static sweep, hf-assisted
# DTYPE (default auto: bfloat16 on this AVX512-BF16 CPU), OUT (default evals/results/cpu_controllers).
set -euo pipefail
stage=${1:?smollm2 or qwen}
out=${OUT:-evals/results/cpu_controllers}
mkdir -p "$out"
export HF_HUB_OFFLINE=1
case "$stage" in
smollm2)
  specdec bench --target smollm2-135m-instruct --dtype "${DTYPE:-auto}" --data spec_bench --limit "${LIMIT:-2}" \
    --dev-limit "${DEV:-1}" --methods "ar,${METHODS:-ngram,fused:drafters=copyspec+recycling}" \
    --controllers "${CONTROLLERS:-goodput,heuristic}" --static-sweep "${SWEEP:-1,2,4,8}" \
    --max-new-tokens "${TOKENS:-96}" --warmup 1 --out "$out/smollm2" 2>&1 | grep -v "━"
  ;;
head)
  specdec train acceptance-head --target qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct \
    --data "$(python3 -c 'import asyncio, os; print(os.path.dirname(asyncio.__file__))')" --dtype "${DTYPE:-auto}" \
    --limit "${SEQUENCES:-160}" --max-length 256 --steps "${STEPS:-400}" --out "$out/qwen_head.safetensors" 2>&1 \
    | grep -v "━" | tee "$out/qwen_head.log"
  ;;
qwen)
  draft=qwen2.5-coder-0.5b-instruct
  python3 evals/scripts/code_questions.py "$out/qwen_code.jsonl" "${CODE:-4}" "${CODING:-2}"
  specdec bench --target qwen2.5-coder-1.5b-instruct --assistant "$draft" --dtype "${DTYPE:-auto}" \
    --data "$out/qwen_code.jsonl" --methods "ar,model:path=$draft,mode=chain,hf-assisted" \
    --controllers "${CONTROLLERS:-goodput,threshold,acceptance_head:head=$out/qwen_head.safetensors,heuristic}" \
    --static-sweep "${SWEEP:-4,8}" --static-width 1 \
    --max-new-tokens "${TOKENS:-96}" --warmup 1 --out "$out/qwen_code" 2>&1 | grep -v "━"
  ;;
esac
