#!/usr/bin/env bash
# Issue 4's end-to-end goal with greedy acceptance on the device (`GraphBackend.verify_greedy`), on one GPU machine,
# one device call per stage, back to back on a warm machine (the zoo target is cached under out/):
#   bash evals/scripts/gpu_accept_ab.sh build    # the zoo target (~7 min), gpu_check beside it on the same GPU
#   bash evals/scripts/gpu_accept_ab.sh bench    # `specdec bench` on code and Spec-Bench, acceptance on the device
#                                                # and on the host (A/B: `accept_ab.py`), alternating runs
#   bash evals/scripts/gpu_accept_ab.sh kernel   # copy bandwidth, the tree-attention tile sweep (N = 64, 8k-32k),
#                                                # AR and verify(64) step times of the 1.1B and 7B shapes
#   bash evals/scripts/gpu_accept_ab.sh rows     # the kernel sweep's --rows mode (7B, N = 64: row tiles vs splits)
# Spec-Bench's questions are expected under .shared/data/spec_bench/ (a copy of ../shared carried with the call).
set -uo pipefail
stage=${1:?build, bench, kernel or rows}
source "$(dirname "$0")/device_env.sh"
case "$stage" in
build)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 evals/scripts/gpu_check.py "$out/gpu_check.txt" > "$out/gpu_check.log" 2>&1 &
  checker=$!
  python3 -c "from specdec.train.pretrain import ensure_model; print(ensure_model('gpu-100m'))" 2>&1 | tail -5
  wait $checker
  grep -v "^PASS tree_attention" "$out/gpu_check.log" | tail -40
  ;;
bench)
  methods=${METHODS:-ar,ngram,copyspec}
  for round in ${ROUNDS:-1 2}; do
    for mode in device host; do
      for data in code:20 spec_bench; do
        limit=""; [ "$data" = spec_bench ] && limit="--limit 4"
        name="${data%%:*}_${mode}_$round"
        python3 evals/scripts/accept_ab.py "$mode" --target zoo:gpu-100m --backend native --data "$data" $limit \
          --warmup 3 --methods "$methods" --max-new-tokens 128 --out "out/ab/$name" 2>&1 \
          | grep -E -i "lossless|mismatch|error|│ " | grep -v "^ *│ *$"
        cp "out/ab/$name/results.md" "$out/$name.md" 2>/dev/null
      done
    done
  done
  python3 evals/scripts/accept_ab.py --summary out/ab | tee "$out/ab_summary.txt"
  ;;
kernel)
  python3 - <<'EOF' 2>&1 | tee "$out/copy_bandwidth.txt"
import torch
x = torch.randn(2 ** 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record(); y.copy_(x); end.record(); end.synchronize()
    times.append(start.elapsed_time(end))
ms = sorted(times)[len(times) // 2]
print(f"{torch.cuda.get_device_name()}: device-to-device copy of 2 GiB, median {ms:.3f} ms = "
      f"{2 * x.numel() * 2 / ms / 1e9:.2f} TB/s (read + write)")
EOF
  (cd evals/scripts && timeout 330 python3 attention_config_bench.py "$out/attention_config.txt" 2>&1 \
    | grep -v OutOfResources)
  timeout 200 specdec bench-step --shapes 1b,7b --paths specdec_tree@native --contexts 2048 --sizes 1,64 --reps 30 \
    --kernel-contexts "" --out "$out/step" 2>&1 | tail -12
  ;;
rows)  # the 7B shape's 64 queries in row tiles of 16 / 32 / 64 with 1-8 key splits
  (cd evals/scripts && timeout 540 python3 attention_config_bench.py "$out/attention_rows.txt" --rows 2>&1 \
    | grep -v OutOfResources)
  ;;
*)
  echo "unknown stage $stage" >&2; exit 2 ;;
esac
