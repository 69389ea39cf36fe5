"""A static-cache backend: the KV cache of all layers is one preallocated buffer, written in place.

Layout: `buffer` (L, 2, 1, Hkv, S_max, D): `buffer[l, 0]` and `buffer[l, 1]` are layer l's keys and values, the
(B, Hkv, S, D) views HF attention reads. A step writes its T = N+1 queries' keys at slots [length, length+T) (the
positions `write_slots`, a device tensor), attends through a (1, 1, T, S_max) float mask that shows the committed
slots and the tree block and hides the stale tail, and commit moves the accepted path's rows of *all layers* right
behind the root in one indexing copy (one gather, one scatter). Nothing is reallocated per step, so the step's
tensors keep their addresses — the precondition for capturing it as a CUDA graph (`GraphBackend`, whose greedy
verifications move the rows on the device instead, `specdec.kernels.greedy_accept`).

Uses the model's own modules through HF's cache interface (a `Cache` of our `CacheLayerMixin` layers), so any
model that calls `past_key_values.update(...)` from its attention works, like with `HFBackend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.backends.hf import HFBackend
from specdec.tree import DraftTree, ancestor_mask


class _Slots:
    """Where the current forward writes: (T,) int64 cache slots, shared by every layer of one cache."""

    def __init__(self, device: torch.device):
        self.write_slots = torch.empty(0, dtype=torch.long, device=device)


class _StaticLayer(CacheLayerMixin):
    """Layer `index` of the shared buffer; `update` writes the new keys at the slots the backend chose."""

    is_compileable = True
    is_sliding = False

    def __init__(self, buffer: torch.Tensor, index: int, slots: _Slots):
        super().__init__()
        self.keys, self.values = buffer[index, 0], buffer[index, 1]
        self.slots = slots
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffer exists before the first forward

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.slots.write_slots, key_states)
        self.values.index_copy_(2, self.slots.write_slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        raise RuntimeError("the static backend always passes position ids; nothing should ask the cache's length")

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


def move_buffer_rows(buffer: torch.Tensor, rows: Sequence[int], start: int) -> None:
    """Copy the KV rows `rows` (in order) to [start, start + len(rows)) in every layer of a static buffer
    (L, 2, 1, Hkv, S_max, D): one gather and one scatter for all layers."""
    source = torch.as_tensor(rows, device=buffer.device)
    target = torch.arange(start, start + len(rows), device=buffer.device)
    buffer.index_copy_(4, target, buffer.index_select(4, source))


@dataclass
class StaticState:
    """buffer: (L, 2, 1, Hkv, S_max, D); length: committed tokens cached (the root's position id)."""

    buffer: torch.Tensor
    cache: Cache
    slots: _Slots
    length: int = 0


class StaticBackend(HFBackend):
    """`HFBackend`'s contract on a preallocated cache of `max_len` slots (default: the model's context window)."""

    def __init__(self, model: PreTrainedModel, max_len: int | None = None):
        super().__init__(model)
        self.max_len = max_len or self.max_positions
        if not self.max_len:
            raise ValueError("the model states no context window; pass max_len=... to size the static cache")
        self.max_positions = min(self.max_len, self.max_positions or self.max_len)

    def new_state(self) -> StaticState:
        config = self.model.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (config.num_hidden_layers, 2, 1, kv_heads, self.max_len, head_dim)
        buffer = torch.zeros(shape, dtype=self.dtype, device=self.device)
        slots = _Slots(self.device)
        cache = Cache(layers=[_StaticLayer(buffer, index, slots) for index in range(shape[0])])
        return StaticState(buffer, cache, slots)

    def _run(self, state: StaticState, token_ids: torch.Tensor, positions: torch.Tensor,
             visible: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Forward `token_ids` written at slots [length, length+T) with `visible` (T, S_max) bool."""
        count = token_ids.numel()
        if state.length + count > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} tokens; this step needs {state.length + count}")
        state.slots.write_slots = torch.arange(state.length, state.length + count, device=self.device)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return self._forward(state, token_ids, positions, mask[None, None], last_only)

    def prefill(self, token_ids: Sequence[int]) -> StaticState:
        state = self.new_state()
        count = len(token_ids)
        if count:
            visible = torch.zeros(count, self.max_len, dtype=torch.bool, device=self.device)
            visible[:, :count] = torch.ones(count, count, dtype=torch.bool, device=self.device).tril()
            self._run(state, self._ids(token_ids), self._positions(0, count), visible, last_only=True)
        return state

    def decode(self, state: StaticState, token: int) -> torch.Tensor:
        return self.score_tree(state, token, DraftTree.empty(self.device))[0]

    def score_tree(self, state: StaticState, root_token: int, tree: DraftTree) -> torch.Tensor:
        count, start = len(tree) + 1, state.length
        token_ids, positions = self._tree_inputs(root_token, tree, start)
        visible = torch.zeros(count, self.max_len, dtype=torch.bool, device=self.device)
        visible[:, : start + 1] = True
        visible[1:, start + 1: start + count] = ancestor_mask(tree).to(self.device)
        return self._run(state, token_ids, positions, visible)

    def prefix_kv(self, state: StaticState, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`HFBackend.prefix_kv`: views into the static buffer."""
        return [(state.buffer[index, 0, ..., : state.length, :], state.buffer[index, 1, ..., : state.length, :])
                for index in range(min(layers, state.buffer.shape[0]))]

    def _move_rows(self, state: StaticState, rows: list[int], start: int) -> None:
        """The accepted rows of every layer in one copy (`HFBackend.commit`)."""
        move_buffer_rows(state.buffer, rows, start)

    def _truncate(self, state: StaticState, length: int) -> None:
        state.length = length  # the rest becomes stale tail, never visible
