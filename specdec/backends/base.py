"""How a target model is run. A backend owns the target's KV cache for one sequence (its `state`).

Cache invariant: between steps the cache holds exactly the committed tokens but the last one, the root, which the
next `score_tree` (or `decode`) feeds. `state.length` is the number of cached tokens, so the root's position id is
`state.length`.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from specdec.tree import DraftTree


@runtime_checkable
class Backend(Protocol):
    vocab_size: int                 # rows of the target's output head (the logits' last dimension)
    device: torch.device
    max_positions: int | None       # the context window, None if unbounded
    model: Any

    def prefill(self, token_ids: Sequence[int]) -> Any:
        """A new state whose cache holds `token_ids` (the committed tokens but the last)."""

    def score_tree(self, state: Any, root_token: int, tree: DraftTree) -> torch.Tensor:
        """One forward over [root] + tree: (N+1, V) logits, row 0 at the root, row 1+i at node i. Leaves the root
        and all N nodes in the cache until `commit`."""

    def commit(self, state: Any, accepted_nodes: Sequence[int], tree_size: int) -> None:
        """After `score_tree`: keep the root and the accepted nodes' KV (in path order), drop the rest."""

    def decode(self, state: Any, token: int) -> torch.Tensor:
        """The plain autoregressive step: feed `token` (then cached) and return its (V,) logits."""
