"""Triton kernels, one per file, each with a torch reference beside it (the fast GPU path adds them)."""
