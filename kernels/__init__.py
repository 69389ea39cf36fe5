"""Triton kernels, one per file, each with a torch reference beside it (the fast GPU path adds them).

- `specdec.kernels.tree_attention`: [root] + N tree queries over [prefix] + [tree] keys (GQA-packed, split-KV,
  tree mask); `register_tree_attention()` plugs it into transformers' attention registry as "specdec_tree".
- `specdec.kernels.kv_compact`: move the accepted path's K/V rows into place in a static cache, all layers in one
  launch.
- `specdec.kernels.greedy_accept`: greedy tree acceptance on the device, the accepted rows' KV moved as it walks
  (`GraphBackend.verify_greedy`).
- For the native forward (`specdec.backends.native`): `gemv` (one-token products with the norm, rotary + KV write,
  SwiGLU gate and residual add fused in), `gemm_rows` (the same for 2-64 rows), `embedding` (a step's few ids),
  `rmsnorm` (add + RMSNorm), `rope_cache` (rotary + KV write), `silu_mul` (the SwiGLU gate).

This file imports nothing of specdec on purpose: run from the repository root (`python -m ...`, `python -c ...`
put the working directory first on sys.path), the top-level folder `kernels/` is what `import kernels` finds, and
transformers imports a package of that name (the Hub's `kernels`; a dependency of transformers >= 5.2x, which then
imports names from it). Imported under that top-level name, this file hands over to the installed package.
"""

import sys as _sys


def _hand_over_to_the_installed_kernels() -> None:
    """Load the installed top-level `kernels` (found on sys.path without this checkout's root) in place of this
    folder; without one, `import kernels` keeps finding this folder, which defines nothing."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [path for path in _sys.path if os.path.abspath(path or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    _sys.modules["kernels"] = module  # what `import kernels` returns once this file has run
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_to_the_installed_kernels()
