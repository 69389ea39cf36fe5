#!/usr/bin/env bash
# Learned drafters on a GPU (issue 6; first run on the H100): a distilled draft model and an early-exit head for the zoo target, then one `specdec bench`
# with ar, hf-assisted (same draft), model chain, model dynamic tree, early_exit and the best model-free drafter.
# Each stage fits one device call (< 10 min); run them back to back on one warm machine:
#   bash evals/scripts/gpu_model_bench.sh build     # zoo target (~7 min) + early-exit heads (~1 min each)
#   bash evals/scripts/gpu_model_bench.sh distill   # draft model: target-generated data, <= 150 s of training, report
#   bash evals/scripts/gpu_model_bench.sh bench-model   # ar, model chain, model tree (graphs); CONTROLLER, TAG
#   bash evals/scripts/gpu_model_bench.sh bench-peers   # ar, hf-assisted (same draft), model tree with an eager draft
#   bash evals/scripts/gpu_model_bench.sh bench-exit    # ar, early_exit at each layer, ngram, fused
#   bash evals/scripts/gpu_model_bench.sh bench-all     # issue 6's one run: ar, hf-assisted, model chain / tree,
#                                                        # early_exit tree, ngram; EXIT_LAYERS=4 builds its one head;
#                                                        # EXTRA=SPECS adds methods to the same run
# (on a GPU `specdec bench` runs each speculative method twice, timed and phase-synchronised: one call with the
# peers and the graph drafters ran past 10 min)
set -euo pipefail
stage=${1:?build, distill, bench-model, bench-peers, bench-exit or bench-all}
source "$(dirname "$0")/device_env.sh"
preset=${PRESET:-gpu-100m}
layers=${EXIT_LAYERS:-2,4}
target=$SPECDEC_CACHE/models/$preset
work=$PWD/out/model_bench
mkdir -p "$work"
case "$stage" in
build)
  python3 -c "from specdec.train.pretrain import ensure_model; print(ensure_model('$preset'))"
  # the exit head trains on the pretrain split's training files only (the bench prompts come from held-out files)
  python3 - "$work/ee_train.txt" <<'EOF'
import sys
from specdec.train.pretrain import PRESETS, iter_texts, python_sources, split_files
train, _ = split_files(python_sources(), PRESETS["gpu-100m"].held_out_every)
text = "\n\n".join(iter_texts(train[:800]))
open(sys.argv[1], "w").write(text)
print(f"exit-head corpus: {len(text) / 1e6:.1f}M chars")
EOF
  for layer in ${layers//,/ }; do
    specdec train early-exit --target "$target" --layer "$layer" --kind mlp --data "$work/ee_train.txt" \
      --out "$work/exit_head_$layer.safetensors" --steps "${EE_STEPS:-1500}" --batch-size 16 --seq-len 512 \
      --lr 2e-3 2>&1 | grep -v "━"
  done
  cp "$target/specdec_pretrain.json" "$out/pretrain_$preset.json"
  ;;
distill)
  specdec train distill --target "$target" --draft "${DRAFT_PRESET:-gpu-small}" --data zoo --out "$work/draft" \
    --num-prompts "${DISTILL_PROMPTS:-2048}" --gen-batch-size 256 --train-seconds "${DISTILL_SECONDS:-150}" \
    --eval-prompts 16 2>&1 | grep -v "━" | tee "$out/distill.log"
  cp "$work/draft/specdec_distill.json" "$out/" 2>/dev/null || true
  ;;
bench-model|bench-peers|bench-exit|bench-all)
  # two calls of < 10 min each (one call with all seven methods ran past 10 min on the eager HF backend);
  # bench-all: issue 6's one run without the eager draft (ar, hf-assisted, model chain and tree on graphs, early
  # exit tree on graphs, ngram), after build and distill on the same machine
  draft=$work/draft
  assistant=""  # hf-assisted's draft model: bench-peers and bench-all run it (bench-exit has no distilled draft)
  [ "$stage" = bench-peers ] || [ "$stage" = bench-all ] && assistant=$draft
  if [ "$stage" = bench-all ]; then
    # model chain and tree verify 8 and 16 queries (one row-GEMM graph step each: equal verify cost) under their own
    # static controller; early exit and ngram under the run's (heuristic: Kangaroo's confidence stop, long copies)
    equal=${EQUAL_COST:-static:max_depth=7,max_nodes=15}
    methods="ar,hf-assisted,model:path=$draft,mode=chain,graphs=True@$equal,model:path=$draft,mode=tree,graphs=True@$equal"
    head=$work/exit_head_${layers##*,}.safetensors
    # the trees twice: scored by learnt acceptance rates (calibrate=True, the default) and by draft probabilities
    methods="$methods,model:path=$draft,mode=tree,graphs=True,calibrate=False@$equal"
    methods="$methods,early_exit:head=$head,mode=tree,graphs=True,early_exit:head=$head,mode=tree,graphs=True,calibrate=False"
    methods="$methods,ngram${EXTRA:+,$EXTRA}"  # EXTRA: more methods, e.g. the cost stop on the draft model:
    # EXTRA="model:path=out/model_bench/draft,mode=tree,graphs=True,cost_stop=True@static:max_depth=7,max_nodes=15"
  elif [ "$stage" = bench-model ]; then
    methods="ar,model:path=$draft,mode=chain,graphs=True,model:path=$draft,mode=tree,graphs=True"
  elif [ "$stage" = bench-peers ]; then
    methods="ar,hf-assisted,model:path=$draft,mode=tree"
  else
    methods="ar"
    for layer in ${layers//,/ }; do
      methods="$methods,early_exit:head=$work/exit_head_$layer.safetensors,mode=chain,graphs=True"
    done
    methods="$methods,early_exit:head=$work/exit_head_${layers##*,}.safetensors,mode=tree,graphs=True"
    methods="$methods,ngram,fused:drafters=copyspec+recycling"
  fi
  set +e
  # CONTROLLER=static:max_depth=7,max_nodes=7: chain and tree both verify 8 queries (one graph bucket: equal cost)
  specdec bench --target "zoo:$preset" --backend "${BACKEND:-graph}" --data "code:${QUESTIONS:-12}" --warmup 2 \
    --methods "$methods" ${assistant:+--assistant "$assistant"} --max-new-tokens 128 --controller "${CONTROLLER:-heuristic}" \
    --out "$out/$stage${TAG:-}" 2>&1 | grep -v "━" | tee "$out/$stage${TAG:-}.log"
  ;;
*)
  echo "unknown stage $stage" >&2; exit 2 ;;
esac
