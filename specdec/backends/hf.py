"""The backend for any transformers causal LM: tree verification through a custom 4D float mask, depth-based
position ids and a `DynamicCache`; the model's own code is not touched."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from specdec.backends.cpu_linear import LinearKernel
from specdec.backends.gqa_attention import GQAAttention
from specdec.backends.growing_cache import GrowingCache
from specdec.tree import DraftTree, ancestor_mask, depth_list


@dataclass
class HFState:
    """One sequence's target cache; `length` = cached tokens (the root's position id)."""

    cache: DynamicCache = field(default_factory=GrowingCache)  # appends in place (HF's own copies the cache a step)
    length: int = 0


def tree_attention_mask(tree: DraftTree, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, N+1, past_len+N+1) additive mask for [root] + tree queries over [cache] + [root] + tree keys.

    Every query sees the whole cache and the root; node i also sees its ancestors and itself. Blocked entries hold
    `finfo.min` (not -inf, which turns fully masked rows into NaN; not bool, which eager attention misreads)."""
    n = len(tree)
    allowed = torch.zeros(n + 1, past_len + n + 1, dtype=torch.bool, device=device)
    allowed[:, : past_len + 1] = True
    allowed[1:, past_len + 1:] = ancestor_mask(tree).to(device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@functools.lru_cache(maxsize=64)  # drafters ask per forward: one signature inspection per function
def cache_keyword(function) -> str:
    """The keyword a transformers forward takes its KV cache by: `cache` from the version that renamed it (5.2x;
    `past_key_values` then warns that it is deprecated), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def context_window(config) -> int | None:
    """Positions the model can attend over: max_position_embeddings, capped by a sliding window if it has one
    (a custom tree mask cannot express the window, so specdec stays inside it)."""
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "sliding_window")]
    limits = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(limits) if limits else None


def move_cache_rows(cache, rows: Sequence[int], start: int) -> None:
    """Copy the KV rows `rows` (in order) of every layer of a transformers cache to [start, start + len(rows))."""
    for layer in cache.layers:
        source = torch.as_tensor(rows, device=layer.keys.device)
        layer.keys[..., start: start + len(rows), :] = layer.keys[..., source, :]
        layer.values[..., start: start + len(rows), :] = layer.values[..., source, :]


class HFBackend:
    """Runs a transformers `PreTrainedModel` (batch 1) in whatever dtype and device it is on.

    linear: the kernel of the model's linear layers on a CPU in float32 (`specdec.backends.cpu_linear`): "auto"
    (oneDNN where it times clearly faster than aten on this machine and model), "aten" or "onednn"."""

    cost_revision = 2  # cost profiles cached before the growing cache and GQA attention are not reused

    def __init__(self, model: PreTrainedModel, linear: str = "auto"):
        self.linear = LinearKernel(model, linear)
        self.gqa = GQAAttention(model)  # masked (tree) forwards on a CPU: grouped KV not copied per head
        self.model = model.eval()
        self.device = model.device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = context_window(model.config)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_keyword = cache_keyword(model.forward)

    @torch.inference_mode()
    def _forward(self, state: HFState, token_ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if last_only and self._logits_to_keep else {}
        with self.linear.active(), self.gqa.active(masked=mask is not None):
            out = self.model(input_ids=token_ids[None], position_ids=positions[None], attention_mask=mask,
                             use_cache=True, **{self._cache_keyword: state.cache}, **kwargs)
        state.length += token_ids.numel()
        return out.logits[0]

    def _ids(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(token_ids, dtype=torch.long).to(self.device)

    def _positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.device)

    def prefill(self, token_ids: Sequence[int]) -> HFState:
        state = HFState()
        if len(token_ids):
            self._forward(state, self._ids(token_ids), self._positions(0, len(token_ids)), None, last_only=True)
        return state

    def decode(self, state: HFState, token: int) -> torch.Tensor:
        return self._forward(state, self._ids([token]), self._positions(state.length, 1), None)[-1]

    def _tree_inputs(self, root_token: int, tree: DraftTree, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([root] + tree token ids, their position ids: the root at `start`, node i at start + its depth)."""
        token_ids = torch.cat([self._ids([root_token]), tree.tokens.to(self.device)])
        return token_ids, start + torch.tensor([0] + depth_list(tree), device=self.device)

    def score_tree(self, state: HFState, root_token: int, tree: DraftTree) -> torch.Tensor:
        token_ids, positions = self._tree_inputs(root_token, tree, state.length)
        mask = tree_attention_mask(tree, state.length, self.dtype, self.device)
        return self._forward(state, token_ids, positions, mask)

    def prefix_kv(self, state: HFState, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached (committed) keys and values of the first `layers` layers, each (1, Hkv, length, D): read-only
        views for drafters that run the target's own first layers (`early_exit`)."""
        return [(layer.keys[..., : state.length, :], layer.values[..., : state.length, :])
                for layer in state.cache.layers[:layers]]

    @torch.inference_mode()
    def commit(self, state: HFState, accepted_nodes: Sequence[int], tree_size: int) -> None:
        """Move the accepted nodes' KV rows right behind the root, then drop the rejected rest."""
        root = state.length - tree_size - 1
        accepted = len(accepted_nodes)
        if accepted and list(accepted_nodes) != list(range(accepted)):
            self._move_rows(state, [root + 1 + node for node in accepted_nodes], root + 1)
        self._truncate(state, root + 1 + accepted)

    def _move_rows(self, state: HFState, rows: list[int], start: int) -> None:
        move_cache_rows(state.cache, rows, start)

    def _truncate(self, state: HFState, length: int) -> None:
        """Keep the first `length` cached rows (the DynamicCache is cropped)."""
        if state.length > length:
            state.cache.crop(length - state.length)
        state.length = length
