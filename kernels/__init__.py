"""Triton kernels, one per file, each with a torch reference beside it (the fast GPU path adds them).

- `specdec.kernels.tree_attention`: [root] + N tree queries over [prefix] + [tree] keys (GQA-packed, split-KV,
  tree mask); `register_tree_attention()` plugs it into transformers' attention registry as "specdec_tree".
- `specdec.kernels.kv_compact`: move the accepted path's K/V rows into place in a static cache, all layers in one
  launch.
- For the native forward (`specdec.backends.native`): `gemv` (one-token products with the norm, rotary + KV write,
  SwiGLU gate and residual add fused in), `gemm_rows` (the same for 2-64 rows), `embedding` (a step's few ids),
  `rmsnorm` (add + RMSNorm), `rope_cache` (rotary + KV write), `silu_mul` (the SwiGLU gate).

This file imports nothing on purpose: run from the repository root, the top-level folder `kernels/` is what
`import kernels` finds, and transformers imports a package of that name (the Hub's `kernels`) to probe for it.
"""
