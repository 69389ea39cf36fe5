"""GPU: the tree-attention kernel's tiles for many queries over a long prefix (issue 4's kernel goal: N = 64, prefix
8k-32k, >= 70% of HBM bandwidth on the KV read). For the 7B shape (32 KV heads, D 128) and the 1.1B shape (4 KV
heads x GQA 8, D 64), N = 64, it times `tree_attention` (kernel + merge, `_kernel_ms`: a CUDA graph of 10 calls)
with each (BLOCK_N, num_warps, num_stages) and split count, against the default (`_block_sizes`,
`num_kv_splits`), and prints the KV read rate.

    python3 evals/scripts/attention_config_bench.py [OUT_FILE]
    python3 evals/scripts/attention_config_bench.py OUT_FILE --small   # verify-sized steps: zoo / 1.1B heads,
                                                                      # N = 1, 8, 16 over 2k keys
    python3 evals/scripts/attention_config_bench.py OUT_FILE --rows    # 7B, N = 64: the 64 rows split into row
                                                                      # tiles of 16 / 32 (fewer key splits, less to
                                                                      # merge; the keys read again, from L2)
"""

from __future__ import annotations

import itertools
import sys

import torch
from host_timing import say  # evals/scripts/host_timing.py

from specdec.evals.step_bench import _kernel_ms
from specdec.kernels import tree_attention as attention

DEFAULT_SIZES = attention._block_sizes


def rate(q, k, v, mask, splits: int | None) -> tuple[float, float]:
    """(microseconds, TB/s of the K and V read) of one call."""
    ms = _kernel_ms(lambda: attention.tree_attention(q, k, v, mask, num_splits=splits), 30)
    return ms * 1e3, 2 * k.numel() * k.element_size() / (ms * 1e-3) / 1e12


def main() -> None:
    say(torch.cuda.get_device_name())
    small, rows = "--small" in sys.argv, "--rows" in sys.argv
    shapes = (("zoo", 12, 4, 64), ("1b", 32, 4, 64)) if small else (("7b", 32, 32, 128), ("1b", 32, 4, 64))
    shapes = shapes[:1] if rows else shapes
    cases = [(n, 2048) for n in (1, 8, 16)] if small else [(64, prefix) for prefix in (8192, 16384, 32768)]
    split_options = (None, 4, 8, 16, 32) if small else (1, 2, 4, 8) if rows else (None, 8)
    row_tiles = (16, 32, 64) if rows else (None,)
    for name, heads, kv_heads, dim in shapes:
        for n, prefix in cases:
            q = torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, kv_heads, prefix + n, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            mask = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
            us, tbs = rate(q, k, v, mask, None)
            results = [(us, "default", tbs)]
            for block_m, block_n, warps, stages, splits in itertools.product(
                    row_tiles, (64, 128) if rows else (32, 64, 128), (4, 8), (2, 3, 4), split_options):
                def sizes(count, head_dim, small_step=False, block_n=block_n, warps=warps, stages=stages,
                          tile=block_m):
                    block_m, _, block_d, _, _ = DEFAULT_SIZES(count, head_dim, small_step)
                    return tile or block_m, block_n, block_d, warps, stages
                attention._block_sizes = sizes
                try:
                    us, tbs = rate(q, k, v, mask, splits)
                except Exception as error:  # a tile that does not fit shared memory
                    say(f"  {name} P={prefix} BLOCK_N={block_n} warps={warps} stages={stages}: {type(error).__name__}")
                    continue
                finally:
                    attention._block_sizes = DEFAULT_SIZES
                label = f"BLOCK_N={block_n} warps={warps} stages={stages} splits={splits or 'default'}"
                results.append((us, (f"BLOCK_M={block_m} " if block_m else "") + label, tbs))
            results.sort()
            best = "; ".join(f"{label}: {us:.1f} us {tbs:.2f} TB/s" for us, label, tbs in results[:5])
            default = next(f"{us:.1f} us {tbs:.2f} TB/s" for us, label, tbs in results if label == "default")
            say(f"{name} N={n} P={prefix}: default {default}; best {best}")
            for tile in row_tiles[:-1]:  # each row tile's own best (the last, 64, is the default's)
                us, label, tbs = next(r for r in results if r[1].startswith(f"BLOCK_M={tile} "))
                say(f"  best with {tile}-row tiles: {label}: {us:.1f} us {tbs:.2f} TB/s")


if __name__ == "__main__":
    main()
