"""How a target model is run: the HF backend for any transformers causal LM (the fast GPU path comes later)."""

from specdec.backends.base import Backend
from specdec.backends.hf import HFBackend, HFState, tree_attention_mask

__all__ = ["Backend", "HFBackend", "HFState", "tree_attention_mask"]
