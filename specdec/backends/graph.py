"""The fast backend: `StaticBackend`'s preallocated cache, each step replayed as a CUDA graph of a bucketed size.

A step of T = N+1 queries runs in the smallest bucket >= T (default 1, 2, 4, ..., 128); the unused rows are padding
(token 0, each sees only itself, its KV lands in the stale tail that no later query sees). Per bucket, everything the
forward reads lives in static device tensors, filled by **one** host-to-device copy of one pinned buffer:

    [tokens (T) | position ids (T) | cache length P (1) | tree mask (T*T, row-major, 0/1)]

and the forward itself derives the rest on the device: the KV write slots P .. P+T-1 and the (1, 1, T, S_max) float
mask (prefix columns < P visible, the tree block through the tree mask, the stale tail hidden). The tree mask and P
are also handed to the attention function as keyword arguments (`specdec_tree_mask`, `specdec_prefix_len`), which
transformers passes through to it: with `attn_implementation="specdec_tree"` the Triton kernel reads only the P + T
live keys (P from device memory, so the graph stays valid as the cache grows); any other implementation reads the
4D mask over the whole static cache.

On CUDA each bucket's forward is captured at the first prefill (after two warm-up runs on a side stream; with specdec's tree
attention switched on for the capture only), all buckets sharing one memory pool, and replayed; elsewhere (CPU tests) the same code runs eagerly, so the padding and masking logic is
tested everywhere. A step that fits no bucket, or whose padding would run past the cache, runs eagerly through
`StaticBackend` (correct, slower). The graphs hold the buffer's addresses, so the backend owns **one** cache: a new
`prefill` starts a new sequence on the same buffer (one sequence at a time, as the generator uses it).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Sequence

import torch
from transformers import PreTrainedModel

from specdec.backends.static import StaticBackend, StaticState
from specdec.tree import DraftTree, depth_list, host_ancestor_mask

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Step:
    """The static tensors and (on CUDA) the graph of one bucket size."""

    def __init__(self, backend: GraphBackend, state: StaticState, size: int):
        device, self.size = backend.device, size
        self.backend, self.state = backend, state
        self.host = torch.zeros(2 * size + 1 + size * size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.inputs = torch.zeros_like(self.host, device=device)
        self.tokens, self.positions = self.inputs[:size], self.inputs[size: 2 * size]
        self.length = self.inputs[2 * size]  # 0-d: P, the committed tokens before the root
        self.tree_flat = self.inputs[2 * size + 1:]
        self.offsets = torch.arange(size, device=device)
        self.columns = torch.arange(backend.max_len, device=device)
        self.write_slots = torch.empty(size, dtype=torch.long, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        """The step on the static tensors: (T, V) logits. Captured as it is; no host reads inside."""
        backend, size = self.backend, self.size
        torch.add(self.offsets, self.length, out=self.write_slots)
        self.state.slots.write_slots = self.write_slots
        tree_mask = self.tree_flat.view(size, size) != 0
        relative = self.columns - self.length  # key slot - P: < 0 prefix, [0, T) this step's block
        in_block = (relative >= 0) & (relative < size)
        block = tree_mask.gather(1, relative.clamp(0, size - 1).expand(size, -1)) & in_block
        visible = (relative < 0) | block
        mask = torch.zeros(visible.shape, dtype=backend.dtype, device=backend.device)
        mask.masked_fill_(~visible, torch.finfo(backend.dtype).min)
        out = backend.model(input_ids=self.tokens[None], position_ids=self.positions[None],
                            attention_mask=mask[None, None], past_key_values=self.state.cache, use_cache=True,
                            specdec_prefix_len=self.length, specdec_tree_mask=tree_mask)
        return out.logits[0]

    def fill(self, root_token: int, tree: DraftTree, start: int) -> None:
        """Write the step's inputs into the pinned buffer and copy them to the device in one transfer."""
        size, count = self.size, len(tree) + 1
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the pinned buffer
        host = self.host
        host.zero_()
        host[0] = root_token
        host[size: size + count] = torch.tensor([0] + depth_list(tree)) + start
        host[2 * size] = start
        mask = host[2 * size + 1:].view(size, size)
        mask.fill_diagonal_(1)  # the root and padding rows see themselves
        if count > 1:
            mask[1:count, 0] = 1
            mask[1:count, 1:count] = host_ancestor_mask(tree).long()
        self.inputs.copy_(host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if count > 1:  # the drafted tokens usually live on the device already: copy them there
            self.tokens[1:count].copy_(tree.tokens, non_blocking=True)

    @torch.inference_mode()
    def run(self) -> torch.Tensor:
        if self.backend.device.type != "cuda":
            return self.forward()
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits

    @torch.inference_mode()
    def capture(self) -> None:
        with self.backend.attention_for_capture():
            self._capture()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits, cuBLAS handles, Triton compiles; rewrites the same slots
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.backend.pool):
            self.logits = self.forward()


class GraphBackend(StaticBackend):
    """`StaticBackend` with bucketed, graph-captured steps. buckets: the step sizes (root + nodes) to capture;
    attention: the attention implementation baked into the graphs ("auto": "specdec_tree" where the Triton kernel
    runs on CUDA, else the model's own; None: the model's own)."""

    def __init__(self, model: PreTrainedModel, max_len: int | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, attention: str | None = "auto"):
        super().__init__(model, max_len)
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be sizes >= 1, got {buckets!r}")
        if attention == "auto":
            from specdec.kernels.tree_attention import kernel_available, register_tree_attention

            attention = register_tree_attention() if self.device.type == "cuda" and kernel_available(
                self.device) else None
        self.attention = attention
        self.buckets = tuple(sorted(set(buckets)))
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self._state: StaticState | None = None
        self._steps: dict[int, _Step] = {}
        self.eager_steps = 0  # steps that fit no bucket and ran through StaticBackend

    @contextlib.contextmanager
    def attention_for_capture(self):
        """The graphs are captured with `attention` (auto: specdec's Triton tree attention on CUDA) and keep it;
        the model's own setting, which eager calls and other users of the model see, is restored afterwards."""
        previous = self.model.config._attn_implementation
        if self.attention is not None and self.attention != previous:
            self.model.set_attn_implementation(self.attention)
        try:
            yield
        finally:
            if self.model.config._attn_implementation != previous:
                self.model.set_attn_implementation(previous)

    def new_state(self) -> StaticState:
        """The one cache the graphs were captured on, emptied (its stale contents are never visible). On CUDA the
        first call captures every bucket, so no timed step ever pays for a capture."""
        if self._state is None:
            self._state = super().new_state()
            if self.device.type == "cuda":
                self.capture_all()
        self._state.length = 0
        return self._state

    def capture_all(self) -> None:
        """Capture each bucket that fits the cache (on dummy inputs at slot 0: the prefill overwrites them)."""
        empty = DraftTree.empty(self.device)
        for size in self.buckets:
            if size <= self.max_len and size not in self._steps:
                step = self._steps[size] = _Step(self, self._state, size)
                step.fill(0, empty, 0)
                step.capture()

    def bucket(self, count: int, start: int) -> int | None:
        """The smallest bucket holding `count` queries whose padding stays inside the cache; None if none does."""
        return next((size for size in self.buckets if size >= count and start + size <= self.max_len), None)

    def score_tree(self, state: StaticState, root_token: int, tree: DraftTree) -> torch.Tensor:
        if state is not self._state:
            raise ValueError("this state is not the graph backend's current sequence (a later prefill replaced it)")
        count, start = len(tree) + 1, state.length
        size = self.bucket(count, start)
        if size is None:
            if count > self.buckets[-1]:
                _warn_eager(f"a step of {count} queries exceeds the largest bucket {self.buckets[-1]}")
            self.eager_steps += 1
            return super().score_tree(state, root_token, tree)
        if start + count > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} tokens; this step needs {start + count}")
        step = self._steps.get(size)
        if step is None:
            step = self._steps[size] = _Step(self, state, size)
        step.fill(root_token, tree, start)
        logits = step.run()
        state.length = start + count
        return logits[:count].clone()  # the static output is overwritten by the next replay


@functools.lru_cache(maxsize=None)
def _warn_eager(reason: str) -> None:
    warnings.warn(f"graph backend runs a step eagerly: {reason}", RuntimeWarning, stacklevel=4)
