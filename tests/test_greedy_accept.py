"""Greedy acceptance + KV compaction on the device (`kernels/greedy_accept.py`) gives what the host path gives:
`greedy_walk`'s accepted path and bonus, and the accepted rows moved behind the root in every layer; through the
graph backend, `verify` takes that path at temperature 0 and keeps the cache exact."""

import random

import pytest
import torch

from specdec import SamplingParams, SpeculativeGenerator
from specdec.accept import greedy_walk
from specdec.backends.graph import GraphBackend
from specdec.backends.hf import HFBackend
from specdec.kernels.greedy_accept import greedy_accept, greedy_accept_reference
from specdec.reference import reference_decode
from specdec.stopping import StopRule
from specdec.tree import DraftTree, path_to
from tiny_models import VOCAB, repetitive_prompt, tiny_model

SHAPE = (3, 2, 1, 2, 40, 24)  # (L, 2, B, Hkv, S_max, D): odd head dim


def _case(seed: int, size: int):
    """A random tree of up to size - 1 nodes (several siblings may share a token), the argmax of each row chosen so
    that paths of random depth pass, padded to `size` rows as a verify step's inputs are."""
    rng = random.Random(seed)
    count = rng.randrange(0, size)  # nodes
    parents = [rng.randrange(-1, node) for node in range(count)]
    tokens = [rng.randrange(5) for _ in range(count)]
    tree = DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    best = [rng.randrange(5) for _ in range(size)]
    row = 0
    while rng.random() < 0.8:  # walk down, making a random child pass at each row
        children = [node for node, parent in enumerate(parents) if parent + 1 == row]
        if not children:
            break
        node = rng.choice(children)
        best[row], row = tokens[node], node + 1
    step_tokens = [7] + tokens + [0] * (size - 1 - count)  # padding rows hold token 0, as a step's do
    parent_rows = [parent + 1 for parent in parents] + [-1] * (size - count)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return tree, as_long(best), as_long(step_tokens), as_long(parent_rows)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("size", [1, 4, 16, 33])
def test_the_outcome_and_the_moved_rows_equal_the_host_walk(seed, size):
    tree, best, tokens, parent_rows = _case(seed, size)
    root_slot = 5
    kv = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    expected_kv = kv.clone()
    deepest, bonus = greedy_walk(tree.host_parents, tree.host_tokens, best.tolist())
    path = path_to(tree, deepest)
    for depth, node in enumerate(path):
        expected_kv[..., root_slot + 1 + depth, :] = kv[..., root_slot + 1 + node, :]
    for accept in (greedy_accept, greedy_accept_reference):
        moved, result = kv.clone(), torch.full((2 * size,), -9, dtype=torch.long)
        accept(best, tokens, parent_rows, torch.tensor(root_slot), moved, result)
        nodes = size - 1
        assert result[:2].tolist() == [len(path), bonus]
        assert result[2: 2 + len(path)].tolist() == path
        assert result[2 + nodes: 2 + nodes + len(path)].tolist() == [tree.host_tokens[node] for node in path]
        assert torch.equal(moved, expected_kv)


def test_padding_rows_are_never_accepted_even_when_the_root_wants_token_zero():
    tree = DraftTree.chain([3])
    best = torch.tensor([3, 0, 0, 0])  # every row's argmax is 0 after the chain: the padding's token
    tokens, parent_rows = torch.tensor([9, 3, 0, 0]), torch.tensor([0, -1, -1, -1])
    result = torch.zeros(8, dtype=torch.long)
    greedy_accept(best, tokens, parent_rows, torch.tensor(0), torch.randn(SHAPE), result)
    assert result[:3].tolist() == [1, 0, 0] and len(tree) == 1  # node 0 accepted, bonus 0, nothing past it


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="result"):
        greedy_accept(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                      torch.zeros(4, dtype=torch.long), torch.tensor(0), torch.randn(SHAPE),
                      torch.zeros(5, dtype=torch.long))


def test_greedy_verification_runs_on_the_device_and_never_calls_the_host_commit(monkeypatch):
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=7)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(40))
    backend = GraphBackend(model, max_len=128)

    def no_host_commit(*args):
        raise AssertionError("greedy verification on the graph backend compacts the KV on the device")

    monkeypatch.setattr(backend, "commit", no_host_commit)
    out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=40)
    assert out.token_ids == truth and out.stats.tau > 1.0
