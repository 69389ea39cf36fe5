#!/usr/bin/env bash
# Online distillation on the GPU, prequential: SmolLM2-135M-Instruct (real, GGUF from the registry), native backend,
# an early-exit head at layer $LAYER that starts untrained (the identity: a plain early exit) and learns online from
# the verify logits, beside the same head frozen, `ar`, and (stage `bench`) a head trained offline on the same
# prompts. Calls on one warm machine: `stash` carrying .gguf_parts/smollm2.part00, `stash` again with part01; then
# `bench` (a code stream of N prompts) or `shift` (code:SHIFT_CODE then Spec-Bench chat, SHIFT_CHAT per category)
# carrying part02, .whl and .shared. TOKENS new tokens per prompt; EVERY buffered positions per update; LR; EPOCHS.
set -euo pipefail
stage=$1
source "$(dirname "$0")/gpu_smollm2_setup.sh" "$stage"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
layer=${LAYER:-10}
head="layer=$layer,threshold=0.0,graphs=True"
learning="early_exit:$head,online=True,online_every=${EVERY:-1024},online_lr=${LR:-2e-3},online_epochs=${EPOCHS:-2},online_background=False"
run_stream() {  # data, out folder, extra methods
  set +e
  specdec bench --stream --target "$name" --backend native --data "$1" --limit "${SHIFT_CHAT:-34}" \
    --max-new-tokens "${TOKENS:-64}" --window "${WINDOW:-50}" --controller static:max_depth=4,max_nodes=4 \
    --methods "ar,$learning,early_exit:$head$3" --out "$2" 2>&1 | grep -v "━" | tail -40
  echo "stream exit code ${PIPESTATUS[0]}"
  set -e
}
if [ "$stage" = bench ]; then
  n=${N:-500}
  python3 -c "
from specdec.evals.data import load_questions
open('out/prompts.txt', 'w').write('\n\n'.join(q.turns[0] for q in load_questions('code:$n')))"
  start=$(date +%s)
  specdec train early-exit --target "$name" --layer "$layer" --data out/prompts.txt --out out/offline_head.safetensors \
    --steps "${STEPS:-300}" --device cuda 2>&1 | grep -v "━" | tail -3
  echo "offline head: $(( $(date +%s) - start )) s"
  run_stream "code:$n" "$out/stream_code" ",early_exit:head=out/offline_head.safetensors,threshold=0.0,graphs=True"
else
  run_stream "code:${SHIFT_CODE:-200}+spec_bench" "$out/stream_shift" ""
fi
