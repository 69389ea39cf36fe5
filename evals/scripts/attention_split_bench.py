"""GPU: how many split-KV chunks the one-query (AR) tree attention should use. At batch 1 the 1.1B shape has only 4 KV
heads, so each split is one program; `num_kv_splits` keeps >= MIN_KEYS_PER_SPLIT keys a split. This times
`tree_attention` (kernel + merge, a CUDA graph of 10 calls) at N = 1 and N = 64 for several split counts.

    python3 evals/scripts/attention_split_bench.py
"""

from __future__ import annotations

import torch

from specdec.evals.step_bench import _kernel_ms
from specdec.kernels.tree_attention import (MIN_KEYS_PER_SPLIT, SMALL_STEP_MIN_KEYS, SMALL_STEP_QUERIES,
                                            _block_sizes, num_kv_splits, tree_attention, triton)


def main() -> None:
    print(torch.cuda.get_device_name(), flush=True)
    for name, heads, kv_heads, dim in (("1b", 32, 4, 64), ("7b", 32, 32, 128), ("zoo", 12, 4, 64)):
        for prefix in (512, 2048, 8192):
            for n in (1, 64):
                q = torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(1, kv_heads, prefix + n, dim, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                mask = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
                rows = heads // kv_heads * n
                small = n <= SMALL_STEP_QUERIES  # tree_attention's own rule
                default = num_kv_splits(kv_heads * triton.cdiv(rows, _block_sizes(rows, dim, small)[0]), prefix,
                                        min_keys=SMALL_STEP_MIN_KEYS if small else MIN_KEYS_PER_SPLIT)
                cells = []
                for splits in sorted({1, 2, 4, 8, 12, 16, 24, 32, 48, 64, default}):
                    if splits * 32 > prefix:
                        continue
                    ms = _kernel_ms(lambda: tree_attention(q, k, v, mask, num_splits=splits), 30)
                    cells.append(f"{splits}{'*' if splits == default else ''}: {ms * 1e3:.1f}")
                print(f"{name} P={prefix} N={n} (splits: us; * = default): " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
