"""Verification: one target forward over [root] + tree, lossless acceptance, KV compaction.

After `verify` the target's cache holds exactly the committed tokens but the new root (the bonus token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from specdec.accept import accept, greedy_walk
from specdec.backends.base import Backend
from specdec.sampling import SamplingParams
from specdec.timing import PhaseTimer
from specdec.tree import DraftTree, path_to


@dataclass(frozen=True)
class VerifyResult:
    """What the target said about one draft tree.

    tree:            the verified tree, where the drafter built it (host or device; sampled acceptance moves it to
                     the target's device)
    accepted_nodes:  node indices of the accepted path, root's child first (possibly empty)
    accepted_tokens: their token ids;  accepted_len = len(accepted_tokens)
    bonus_token:     the target's own token after the accepted path; committed = accepted_tokens + [bonus_token]
    logits:          (N+1, V) target logits, row 0 at the root, row 1+i at node i (for drafters that learn)
    """

    tree: DraftTree
    accepted_nodes: list[int]
    accepted_tokens: list[int]
    bonus_token: int
    logits: torch.Tensor

    @property
    def accepted_len(self) -> int:
        return len(self.accepted_nodes)

    @property
    def committed_tokens(self) -> list[int]:
        return self.accepted_tokens + [self.bonus_token]


def verify(backend: Backend, state: Any, root_token: int, tree: DraftTree, params: SamplingParams,
           generator: torch.Generator | None, timer: PhaseTimer | None = None) -> VerifyResult:
    """Score [root] + tree in one target forward, accept the longest correct path, keep only its KV."""
    timer = timer or PhaseTimer()
    on_device = getattr(backend, "verify_greedy", None) if params.greedy else None
    if on_device is not None:
        with timer("verify"):
            launched = on_device(state, root_token, tree)
        if launched is not None:
            with timer("accept"):  # the step's one host read; the KV was compacted on the device already
                accepted_nodes, accepted_tokens, bonus_token = launched.read()
            return VerifyResult(tree=tree, accepted_nodes=accepted_nodes, accepted_tokens=accepted_tokens,
                                bonus_token=bonus_token, logits=launched.logits)
    with timer("verify"):
        logits = backend.score_tree(state, root_token, tree)
    with timer("accept"):  # the step's one host sync: the outcome (or greedy: every row's argmax) and the tokens
        if params.greedy:
            best, tokens = _read_with_tokens(logits.argmax(-1), tree)
            deepest_node, bonus_token = greedy_walk(tree.host_parents, tokens, best)
        else:
            tree = tree.to(logits.device)  # sampled acceptance runs on the device
            acceptance = accept(tree, logits, params, generator)
            outcome = torch.stack([acceptance.deepest_node, acceptance.bonus_token])
            (deepest_node, bonus_token), tokens = _read_with_tokens(outcome, tree)
    with timer("commit"):
        accepted_nodes = path_to(tree, deepest_node)
        backend.commit(state, accepted_nodes, len(tree))
    return VerifyResult(tree=tree, accepted_nodes=accepted_nodes,
                        accepted_tokens=[tokens[node] for node in accepted_nodes],
                        bonus_token=bonus_token, logits=logits)


def _read_with_tokens(values: torch.Tensor, tree: DraftTree) -> tuple[list[int], Sequence[int]]:
    """(values, the tree's tokens) on the host: one device read, of both where the tree's tokens are not on the host
    already (`host_tokens`)."""
    if tree.host_tokens is not None:
        return values.tolist(), tree.host_tokens
    read = torch.cat([values, tree.tokens]).tolist()
    return read[: values.numel()], read[values.numel():]
