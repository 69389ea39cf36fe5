"""How a target model is run: `hf` (DynamicCache) and `static` (one preallocated buffer written in place) for any
transformers causal LM."""

from specdec.backends.base import Backend
from specdec.backends.hf import HFBackend, HFState, tree_attention_mask
from specdec.backends.static import StaticBackend, StaticState

BACKENDS = {"hf": HFBackend, "static": StaticBackend}

__all__ = ["BACKENDS", "Backend", "HFBackend", "HFState", "StaticBackend", "StaticState", "tree_attention_mask"]
