"""Training recipes, imported as `specdec.train`: the default target (`pretrain`), drafter distillation, heads.

Submodules are imported on demand (`from specdec.train import pretrain`); importing this package is cheap.
"""
