"""The host-side fast paths of the decode loop give exactly what the plain torch code they replaced gave."""

import pytest
import torch

from specdec import SamplingParams, SpeculativeGenerator
from specdec.backends.graph import GraphBackend
from specdec.tree import DraftTree, host_ancestor_mask
from specdec.verify import _read_with_tokens, verify
from tiny_models import VOCAB, repetitive_prompt, tiny_model, tiny_tokenizer

TREES = [DraftTree.empty(), DraftTree.chain([4, 5, 6]), DraftTree.from_paths([[1, 2, 3], [1, 4], [5], [5, 6, 7, 8]])]


def _torch_fill(size: int, width: int, tokens, positions, prefix: int, offset: int, block_mask,
                parent_rows=None) -> torch.Tensor:
    """The pinned buffer's layout written with torch ops: [tokens | positions | P | L - P | block mask | parent
    rows (zeros unless given; given: the rows, then -1)]."""
    host = torch.zeros(3 * size + 2 + size * width, dtype=torch.long)
    count, used = block_mask.shape
    host[: len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
    host[size: size + count] = torch.tensor(list(positions), dtype=torch.long)
    host[2 * size], host[2 * size + 1] = prefix, offset
    mask = host[2 * size + 2: 2 * size + 2 + size * width].view(size, width)
    mask[:count, :used] = block_mask
    padding = torch.arange(count, size)
    mask[padding, (offset + padding).clamp(max=width - 1)] = 1
    if parent_rows is not None:
        host[2 * size + 2 + size * width:] = -1
        host[2 * size + 2 + size * width: 2 * size + 2 + size * width + len(parent_rows)] = torch.tensor(parent_rows)
    return host


@pytest.mark.parametrize("size, width, count, offset", [(4, 4, 3, 0), (8, 8, 8, 0), (4, 16, 3, 5), (4, 8, 2, 6)])
def test_fill_writes_the_layout_the_torch_ops_wrote(size, width, count, offset):
    backend = GraphBackend(tiny_model("llama"), max_len=64)
    state = backend.prefill([1, 2, 3])
    step = backend._step(size, width)
    block = torch.rand(count, offset + count, generator=torch.Generator().manual_seed(size + offset)) < 0.5
    tokens, positions = list(range(7, 7 + count)), range(20, 20 + count)
    parent_rows = [0] + list(range(count - 2))  # a chain after the root (only verifications give them)
    for parents in (parent_rows, None, None):  # a later fill over a used buffer leaves nothing of the one before
        step.fill(tokens, positions, 11, offset, block, parent_rows=parents)
        assert torch.equal(step.host, _torch_fill(size, width, tokens, positions, 11, offset, block, parents))
        assert torch.equal(step.inputs, step.host)
    del state


@pytest.mark.parametrize("tree", TREES)
def test_the_verification_block_mask_is_the_root_column_and_the_ancestor_mask(tree):
    count = len(tree) + 1
    expected = torch.zeros(count, count, dtype=torch.bool)
    expected[:, 0] = True
    expected[1:, 1:] = host_ancestor_mask(tree)
    assert torch.equal(host_ancestor_mask(tree, with_root=True), expected)


def test_host_tokens_follow_the_tree_and_are_checked():
    tree = DraftTree.from_paths([[3, 4], [3, 9]])
    assert tree.host_tokens == (3, 4, 9) and DraftTree.empty().host_tokens == ()
    assert tree.to("cpu") is tree and tree.to("cpu").host_tokens == (3, 4, 9)
    with pytest.raises(ValueError, match="host_tokens must equal tokens"):
        DraftTree(tree.tokens, tree.parents, host_tokens=(3, 4, 8))


@pytest.mark.parametrize("tree", TREES)
def test_reading_tokens_from_the_device_equals_the_host_copy(tree):
    values = torch.tensor([7, 8, 9])
    on_device_only = DraftTree(tree.tokens, tree.parents)
    object.__setattr__(on_device_only, "host_tokens", None)  # as a tree built on a GPU has it
    assert _read_with_tokens(values, on_device_only) == ([7, 8, 9], list(tree.host_tokens))
    assert _read_with_tokens(values, tree) == ([7, 8, 9], tree.host_tokens)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=3)])
def test_verify_reads_the_same_with_or_without_host_tokens(params):
    model, tree = tiny_model("llama"), TREES[2]
    prompt = repetitive_prompt(VOCAB, seed=1)
    results = []
    for host_tokens in (True, False):
        backend = GraphBackend(model, max_len=64)
        state = backend.prefill(prompt[:-1])
        checked = DraftTree(tree.tokens, tree.parents)
        if not host_tokens:
            object.__setattr__(checked, "host_tokens", None)
        generator = torch.Generator().manual_seed(5)
        result = verify(backend, state, prompt[-1], checked, params, generator)
        results.append((result.accepted_nodes, result.accepted_tokens, result.bonus_token, state.length,
                        result.logits))
    assert results[0][:4] == results[1][:4] and torch.equal(results[0][4], results[1][4])


def test_generate_decodes_the_text_once_and_streams_the_same_text(monkeypatch):
    tokenizer = tiny_tokenizer()
    generator = SpeculativeGenerator(tiny_model("llama"), tokenizer=tokenizer, drafter="ngram")
    calls = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs))
    out = generator.generate("abcabcabcabc", max_new_tokens=30)
    assert len(calls) == 1 and out.text == decode(out.token_ids, skip_special_tokens=True)
    assert out.stats.target_forwards > 1
    chunks = list(generator.stream("abcabcabcabc", max_new_tokens=30))
    assert "".join(chunk.text for chunk in chunks) == out.text
