#!/usr/bin/env bash
# Chain vs dynamic trees (topk 2 / 4 / 8, scored by draft probabilities and calibrated) of one model draft for the
# CPU zoo target, all at 15 nodes and depth 7 (the chain: 7 nodes); prints method, tok/s, τ, t_draft.
#   specdec train distill --target ~/.cache/specdec/models/cpu-tiny --draft cpu-small --data zoo --out DRAFT \
#     [--max-steps 60 | 150 for weaker drafts]
#   bash evals/scripts/cpu_tree_sweep.sh DRAFT OUT_DIR
set -euo pipefail
draft=${1:?a draft model dir}
out=${2:?an output dir}
equal=static:max_depth=7,max_nodes=15
methods="ar,model:path=$draft,mode=chain@$equal"
for k in 2 4 8; do
  methods="$methods,model:path=$draft,mode=tree,topk=$k,calibrate=False@$equal,model:path=$draft,mode=tree,topk=$k@$equal"
done
specdec bench --target zoo:cpu-tiny --data code:20 --max-new-tokens 64 --warmup 0 --methods "$methods" --out "$out" \
  > "$out.log" 2>&1
grep -E "^\| (ar|model)" "$out/results.md" | cut -d'|' -f2,4,7,9 | sed "s#model:path=$draft,##; s#@$equal##"
