"""How a target model is run: `hf` (DynamicCache), `static` (one preallocated buffer written in place) and `graph`
(the static buffer, each step replayed as a CUDA graph of a bucketed size) for any transformers causal LM; `native`
(the graph backend with specdec's own Llama-family forward, ~10 kernels a layer; else `graph` with a warning)."""

from specdec.backends.base import Backend
from specdec.backends.hf import HFBackend, HFState, tree_attention_mask
from specdec.backends.graph import GraphBackend
from specdec.backends.native import NativeBackend, native_backend
from specdec.backends.static import StaticBackend, StaticState

BACKENDS = {"hf": HFBackend, "static": StaticBackend, "graph": GraphBackend, "native": native_backend}

__all__ = ["BACKENDS", "Backend", "GraphBackend", "HFBackend", "HFState", "NativeBackend", "StaticBackend", "StaticState",
           "tree_attention_mask"]
