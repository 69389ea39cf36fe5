"""The HF backend: the tree attention mask, tree scoring against sequential decoding, and the cache invariant —
after every verify step the KV cache holds exactly the committed tokens but the last (the root)."""

import random

import pytest
import torch
import transformers

from specdec.backends.hf import HFBackend, context_window, tree_attention_mask
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from specdec.tree import DraftTree, ancestor_mask, path_to, paths
from specdec.verify import verify
from tiny_models import ARCHITECTURES, VOCAB, breadth_first, repetitive_prompt, single_thread, tiny_model

ATOL = 1e-10  # float64: the tree forward and a fresh prefill differ by rounding only (~1e-15)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


# ----------------------------------------------------------------------------------------------- tree attention mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("past_len", [0, 1, 5])
def test_tree_attention_mask_values(dtype, past_len):
    tree = DraftTree(torch.tensor([4, 5, 6, 7, 8, 9]), torch.tensor([-1, 0, -1, 1, 2, 0]))
    n = len(tree)
    mask = tree_attention_mask(tree, past_len, dtype, torch.device("cpu"))
    assert mask.shape == (1, 1, n + 1, past_len + n + 1) and mask.dtype == dtype
    blocked = torch.finfo(dtype).min
    assert not torch.isinf(mask).any() and not torch.isnan(mask).any()
    for row in range(n + 1):
        node_keys = set() if row == 0 else set(path_to(tree, row - 1))
        for col in range(past_len + n + 1):
            allowed = col <= past_len or (col - past_len - 1) in node_keys
            assert mask[0, 0, row, col].item() == (0.0 if allowed else blocked), (row, col)


def test_tree_attention_mask_empty_tree_and_chain():
    empty = tree_attention_mask(DraftTree.empty(), 3, torch.float32, torch.device("cpu"))
    assert empty.shape == (1, 1, 1, 4) and bool((empty == 0).all())
    chain = tree_attention_mask(DraftTree.chain([1, 2, 3]), 2, torch.float32, torch.device("cpu"))[0, 0]
    allowed = chain == 0
    assert torch.equal(allowed[:, 2:], torch.ones(4, 4, dtype=torch.bool).tril())  # causal over root + chain
    assert bool(allowed[:, :2].all())


def test_context_window():
    assert context_window(transformers.LlamaConfig(max_position_embeddings=300)) == 300
    assert context_window(transformers.MistralConfig(max_position_embeddings=300, sliding_window=64)) == 64
    assert context_window(transformers.MistralConfig(max_position_embeddings=300, sliding_window=None)) == 300
    assert context_window(transformers.GPT2Config(n_positions=128)) == 128
    for arch in ARCHITECTURES:
        assert HFBackend(tiny_model(arch)).max_positions == 256


def test_backend_attributes():
    model = tiny_model("gpt2")
    backend = HFBackend(model)
    assert backend.vocab_size == VOCAB and backend.dtype == torch.float64 and backend.device == model.device


# ------------------------------------------------------------------------------------ tree scoring == sequential


def _sequential_logits(backend, committed, tokens):
    """Logits after each of [root] + tokens, fed one at a time on top of a fresh prefill of committed[:-1]."""
    state = backend.prefill(committed[:-1])
    rows = [backend.decode(state, committed[-1])]
    rows += [backend.decode(state, token) for token in tokens]
    return torch.stack(rows)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tree_logits_equal_sequential(arch):
    backend = HFBackend(tiny_model(arch))
    committed = repetitive_prompt(VOCAB, seed=1, length=13)
    tree = DraftTree.from_paths([[5, 6, 7, 8], [5, 6, 9], [5, 10], [11, 12, 13], [14]])
    tree = breadth_first(tree)  # siblings' subtrees interleaved
    state = backend.prefill(committed[:-1])
    logits = backend.score_tree(state, committed[-1], tree)
    assert logits.shape == (len(tree) + 1, VOCAB) and logits.dtype == torch.float64
    assert state.length == len(committed) - 1 + 1 + len(tree)
    for path in paths(tree):
        expected = _sequential_logits(backend, committed, tree.tokens[path].tolist())
        torch.testing.assert_close(logits[[0] + [node + 1 for node in path]], expected, atol=ATOL, rtol=0)


def test_decode_after_empty_prefill():
    """A one-token prompt: the cache starts empty and the first forward is the root alone."""
    backend = HFBackend(tiny_model("llama"))
    state = backend.prefill([])
    assert state.length == 0
    logits = backend.decode(state, 7)
    assert state.length == 1
    full = tiny_model("llama")(torch.tensor([[7]])).logits[0, -1]
    torch.testing.assert_close(logits, full, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- KV cache == the committed tokens


def _wrong(token: int, rng: random.Random) -> int:
    return (token + rng.randrange(1, VOCAB)) % VOCAB


def _random_tree_around(truth: list[int], rng: random.Random, true_len: int) -> tuple[DraftTree, int]:
    """A random tree holding the first `true_len` tokens of the true continuation `truth` among wrong branches,
    the true branch at a random sibling rank. Returns the tree and the accepted length greedy decoding must find."""
    token_paths = [truth[:true_len] + [_wrong(truth[true_len], rng)] * rng.randrange(0, 2)]
    for _ in range(rng.randrange(0, 4)):  # wrong branches: leave the truth at some depth, then anything
        leave = rng.randrange(0, true_len + 1)
        token_paths.append(truth[:leave] + [_wrong(truth[leave], rng)]
                           + [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 3))])
    rng.shuffle(token_paths)
    tree = DraftTree.from_paths(token_paths)
    if rng.random() < 0.5:
        tree = breadth_first(tree)
    expected = max(_common_prefix(path, truth) for path in token_paths)
    return tree, expected


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _assert_cache_holds(backend, state, committed):
    """state's cache == a fresh prefill of committed[:-1], layer by layer."""
    assert state.length == len(committed) - 1
    fresh = backend.prefill(committed[:-1])
    assert len(state.cache.layers) == len(fresh.cache.layers)
    for layer, fresh_layer in zip(state.cache.layers, fresh.cache.layers):
        assert layer.keys.shape == fresh_layer.keys.shape
        torch.testing.assert_close(layer.keys, fresh_layer.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.values, fresh_layer.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_cache_holds_committed_tokens_greedy(arch):
    backend = HFBackend(tiny_model(arch))
    rng = random.Random(arch)
    prompt = repetitive_prompt(VOCAB, seed=2, length=9)
    truth = reference_decode(backend, prompt, SamplingParams(), StopRule(90))
    state = backend.prefill(prompt[:-1])
    committed = list(prompt)
    accepted_lens, moved = [], 0
    for step in range(18):
        done = len(committed) - len(prompt)
        tree, expected = _random_tree_around(truth[done:], rng, true_len=step % 6)
        result = verify(backend, state, committed[-1], tree, SamplingParams(), None)
        assert result.accepted_len == expected
        assert result.committed_tokens == truth[done: done + expected + 1]
        committed += result.committed_tokens
        accepted_lens.append(result.accepted_len)
        moved += result.accepted_nodes != list(range(result.accepted_len))
        _assert_cache_holds(backend, state, committed)
    assert set(accepted_lens) == set(range(6))
    assert moved >= 3  # accepted paths that were not the first nodes: their KV had to be moved


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_cache_holds_committed_tokens_sampling(arch):
    """Random acceptance (temperature > 0): whatever path wins, the cache must match it."""
    backend = HFBackend(tiny_model(arch))
    rng = random.Random(7)
    params = SamplingParams(temperature=0.3, top_k=2, seed=11)
    generator = torch.Generator().manual_seed(11)
    prompt = repetitive_prompt(VOCAB, seed=4, length=9)
    state = backend.prefill(prompt[:-1])
    committed = list(prompt)
    accepted_lens = []
    for step in range(20):
        likely = reference_decode(backend, committed, SamplingParams(), StopRule(6))  # often accepted
        tree, _ = _random_tree_around(likely, rng, true_len=step % 6)
        result = verify(backend, state, committed[-1], tree, params, generator)
        committed += result.committed_tokens
        accepted_lens.append(result.accepted_len)
        _assert_cache_holds(backend, state, committed)
    assert max(accepted_lens) >= 2 and min(accepted_lens) == 0


def test_commit_moves_a_later_branch_into_place():
    """Hand-made: the accepted path is the second root branch (nodes 3, 4); after commit the cache equals a fresh
    prefill and the next decode gives the sequential logits."""
    backend = HFBackend(tiny_model("qwen3"))
    prompt = repetitive_prompt(VOCAB, seed=5, length=7)
    truth = reference_decode(backend, prompt, SamplingParams(), StopRule(4))
    wrong = [_wrong(t, random.Random(0)) for t in truth]
    tree = DraftTree.from_paths([[wrong[0], truth[1], truth[2]], [truth[0], truth[1]], [wrong[0], wrong[1]]])
    assert tree.tokens[[3, 4]].tolist() == truth[:2]
    state = backend.prefill(prompt[:-1])
    result = verify(backend, state, prompt[-1], tree, SamplingParams(), None)
    assert result.accepted_nodes == [3, 4] and result.bonus_token == truth[2]
    committed = prompt + truth[:3]
    _assert_cache_holds(backend, state, committed)
    fresh = backend.prefill(committed[:-1])
    torch.testing.assert_close(backend.decode(state, committed[-1]), backend.decode(fresh, committed[-1]),
                               atol=ATOL, rtol=0)


def test_ancestor_mask_used_by_backend_matches_tree():
    tree = DraftTree.from_paths([[1, 2], [3]])
    mask = tree_attention_mask(tree, 0, torch.float32, torch.device("cpu"))[0, 0, 1:, 1:]
    assert torch.equal(mask == 0, ancestor_mask(tree))
