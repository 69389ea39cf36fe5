"""The `model` drafter's chains for a whole batch: one draft forward per depth for every row (BASS's batched draft).

Per row, `ModelDrafter.propose` runs the draft model on its own cache: a batch of B rows costs B forwards a depth.
`BatchedChains` keeps the draft model's KV of all B rows in one batched cache (`specdec.batch`: the native one where
the target runs natively, else HF's modules) and drafts every row's greedy chain together:

    catch-up   one forward over each row's committed tokens its cache lacks (the accepted tokens and the bonus of
               the row's last step: 1 + accepted, a ragged chain per row); its last query's argmax is node 1
    depth d    one forward of one query per row (node d - 1 as the root of an empty tree); its argmax is node d

The drafted tokens' KV is not kept: after the chain each row's length falls back to its committed tokens, and the
next catch-up feeds what the target accepted (with the positions the drafts ran at, so the same numbers). A row
whose cache is not a prefix of its tokens (a new sequence in the row) or lags by more than a step's width is
prefilled anew. Trees are proposals only: what the target accepts is decided by verification, so a chain here is
lossless whatever it drafts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from specdec.drafters.base import DraftContext
from specdec.tree import DraftTree

CATCH_UP = 32  # committed tokens a row may lack and still catch up in the step (a batched step's widest width - 1)


class BatchedChains:
    """Greedy chains of `model` for `batch_size` rows, each of at most min(max_depth, max_nodes) of its budget."""

    def __init__(self, model, batch_size: int, max_len: int, native=False):
        from specdec.batch_native import batched_backend

        self.cache = batched_backend(model, batch_size, native=native, max_len=max_len)
        self.cache.capture_all()
        self.cached: list[list[int] | None] = [None] * batch_size  # the tokens row b's cache holds
        self.forwards = 0  # draft forwards run (each for every drafting row)

    def release(self, row: int) -> None:
        """Row `row` takes a new sequence: its cache is prefilled at its first proposal."""
        self.cached[row] = None

    @torch.inference_mode()
    def propose(self, contexts: Sequence[DraftContext | None]) -> list[DraftTree | None]:
        """Per row a chain (None: the row drafts nothing this step)."""
        lengths = [0 if ctx is None else min(ctx.budget.max_depth, ctx.budget.max_nodes) for ctx in contexts]
        roots, trees = self._catch_up(contexts, lengths)
        if not any(root is not None for root in roots):
            return [None] * len(contexts)
        chains: list[list[int]] = [[] for _ in contexts]
        empty = DraftTree.empty()  # every row's tree past the catch-up (a tree is immutable)
        for depth in range(1, max(lengths) + 1):
            _, best = self.cache.score(roots, trees, argmax=True, keep_logits=False)
            self.forwards += 1
            self.cache.commit([None if root is None else list(range(len(trees[b]))) for b, root in enumerate(roots)])
            for b, root in enumerate(roots):
                if root is not None:
                    chains[b].append(best[b][-1])
            roots = [chains[b][-1] if root is not None and depth < lengths[b] else None
                     for b, root in enumerate(roots)]
            trees = [empty if root is not None else None for root in roots]
        for b, cached in enumerate(self.cached):  # the drafted tokens' KV is dropped (stale, never read)
            if cached is not None:
                self.cache.lengths[b] = len(cached)
        return [DraftTree._built(chain, range(-1, len(chain) - 1), ("model",) * len(chain)) if chain else None
                for chain in chains]

    def _catch_up(self, contexts, lengths):
        """Each drafting row's committed tokens its cache lacks, as a root and a chain behind it (the rows that
        cannot catch up in one step prefilled anew first); the cache then holds them all."""
        roots: list[int | None] = [None] * len(contexts)
        trees: list[DraftTree | None] = [None] * len(contexts)
        for b, (ctx, length) in enumerate(zip(contexts, lengths)):
            if ctx is None or length <= 0:
                continue
            # the row's committed list, kept as it is: the batch hands a drafter's row a new list after the step
            tokens, cached = ctx.token_ids, self.cached[b]
            if (cached is None or len(tokens) - len(cached) > CATCH_UP or len(cached) >= len(tokens)
                    or tokens[:len(cached)] != cached):
                self.cache.prefill_row(b, tokens[:-1])
                cached = tokens[:-1]
            new = tokens[len(cached):]
            roots[b], trees[b] = new[0], DraftTree._built(new[1:], range(-1, len(new) - 2))
            self.cached[b] = tokens
        return roots, trees
