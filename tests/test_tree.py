"""Unit tests of specdec/tree.py (DraftTree and its derived structure) and of the ngram drafter on hand-made
contexts."""

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from specdec.controllers import Budget
from specdec.drafters import DraftContext, TargetView
from specdec.drafters.ngram import NgramDrafter
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree, ancestor_mask, depths, path_to, paths, position_ids


def tree_of(tokens, parents):
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


# the worked example of tree.py: drafts "a b c" and "a d" (a=10, b=11, c=12, d=13)
EXAMPLE = tree_of([10, 11, 12, 13], [-1, 0, 1, 0])


# ---------------------------------------------------------------------------------------------- DraftTree basics


def test_worked_example():
    assert depths(EXAMPLE).tolist() == [1, 2, 3, 2]
    assert paths(EXAMPLE) == [[0, 1, 2], [0, 3]]
    assert position_ids(EXAMPLE, root_position=7).tolist() == [8, 9, 10, 9]
    assert [path_to(EXAMPLE, node) for node in (-1, 0, 1, 2, 3)] == [[], [0], [0, 1], [0, 1, 2], [0, 3]]
    assert ancestor_mask(EXAMPLE).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, False, False, True],
    ]
    assert len(EXAMPLE) == 4


def test_forest_below_the_root():
    tree = tree_of([5, 6, 7, 8, 9], [-1, -1, 0, 1, -1])
    assert depths(tree).tolist() == [1, 1, 2, 2, 1]
    assert paths(tree) == [[0, 2], [1, 3], [4]]
    mask = ancestor_mask(tree)
    assert mask.dtype == torch.bool and mask.shape == (5, 5)
    assert mask.sum(1).tolist() == [1, 1, 2, 2, 1]
    assert mask[3].nonzero().flatten().tolist() == [1, 3]


def test_chain():
    tree = DraftTree.chain([4, 5, 6], source="x")
    assert tree.tokens.tolist() == [4, 5, 6] and tree.parents.tolist() == [-1, 0, 1]
    assert tree.source == ("x", "x", "x") and tree.draft_probs is None
    assert depths(tree).tolist() == [1, 2, 3]
    assert paths(tree) == [[0, 1, 2]]
    assert torch.equal(ancestor_mask(tree), torch.ones(3, 3, dtype=torch.bool).tril())


def test_chain_with_draft_probs():
    probs = torch.full((2, 9), 1 / 9)
    tree = DraftTree.chain(torch.tensor([1, 2]), draft_probs=probs)
    assert tree.draft_probs is probs


def test_empty():
    tree = DraftTree.empty()
    assert len(tree) == 0 and tree.tokens.dtype == torch.long and tree.parents.dtype == torch.long
    assert depths(tree).tolist() == [] and paths(tree) == [] and path_to(tree, -1) == []
    assert ancestor_mask(tree).shape == (0, 0)
    assert len(DraftTree.chain([])) == 0
    assert len(DraftTree.from_paths([])) == 0 and len(DraftTree.from_paths([[]])) == 0


def test_from_paths_merges_shared_prefixes():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [1, 5], [6]], source="ngram")
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert tree.parents.tolist() == [-1, 0, 1, 1, 0, -1]
    assert tree.source == ("ngram",) * 6
    assert [tree.tokens[p].tolist() for p in paths(tree)] == [[1, 2, 3], [1, 2, 4], [1, 5], [6]]


def test_from_paths_duplicate_and_prefix_paths_add_nothing():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 2], [1, 2, 3]])
    assert tree.tokens.tolist() == [1, 2, 3] and tree.parents.tolist() == [-1, 0, 1]


def test_from_paths_same_token_under_different_parents_is_two_nodes():
    tree = DraftTree.from_paths([[1, 7], [2, 7]])
    assert tree.tokens.tolist() == [1, 7, 2, 7] and tree.parents.tolist() == [-1, 0, -1, 2]


def test_from_paths_max_nodes_cuts_in_insertion_order():
    paths_in = [[1, 2, 3], [1, 4, 5], [6, 7]]
    assert DraftTree.from_paths(paths_in, max_nodes=4).tokens.tolist() == [1, 2, 3, 4]  # second path cut part-way
    cut = DraftTree.from_paths(paths_in, max_nodes=4)
    assert cut.parents.tolist() == [-1, 0, 1, 0]
    assert DraftTree.from_paths(paths_in, max_nodes=0).tokens.tolist() == []
    assert len(DraftTree.from_paths(paths_in, max_nodes=100)) == 7
    # a shared prefix costs nothing: [1, 2, 9] only needs one new node
    assert DraftTree.from_paths([[1, 2, 3], [1, 2, 9]], max_nodes=4).tokens.tolist() == [1, 2, 3, 9]


def test_to_keeps_everything():
    probs = torch.rand(4, 20)
    tree = DraftTree(EXAMPLE.tokens, EXAMPLE.parents, probs, ("a",) * 4).to("cpu")
    assert torch.equal(tree.tokens, EXAMPLE.tokens) and torch.equal(tree.parents, EXAMPLE.parents)
    assert torch.equal(tree.draft_probs, probs) and tree.source == ("a",) * 4


def test_frozen():
    with pytest.raises(AttributeError):
        EXAMPLE.tokens = torch.tensor([1])


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 0, 3], [-1, 2, 0], [-2]])
def test_non_topological_parents_rejected(parents):
    with pytest.raises(ValueError, match="parents"):
        tree_of(list(range(len(parents))), parents)


def test_dtype_rejected():
    with pytest.raises(TypeError, match="int64"):
        DraftTree(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="int64"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1.0, 0.0]))


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="1-D"):
        DraftTree(torch.tensor([1, 2, 3]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="1-D"):
        DraftTree(torch.tensor([[1, 2]]), torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="draft_probs"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1, 0]), draft_probs=torch.rand(3, 10))
    with pytest.raises(ValueError, match="draft_probs"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1, 0]), draft_probs=torch.rand(2))
    with pytest.raises(ValueError, match="source"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1, 0]), source=("a",))


# ---------------------------------------------------------------------------------------- random trees (hypothesis)


@st.composite
def random_trees(draw, max_nodes=24):
    n = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return tree_of(tokens, parents)


def _children(tree):
    children = {i: [] for i in range(-1, len(tree))}
    for node, parent in enumerate(tree.parents.tolist()):
        children[parent].append(node)
    return children


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(random_trees())
def test_ancestor_mask_rows_are_the_paths(tree):
    mask = ancestor_mask(tree)
    for node in range(len(tree)):
        assert set(mask[node].nonzero().flatten().tolist()) == set(path_to(tree, node))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(random_trees())
def test_paths_cover_every_leaf_once(tree):
    children = _children(tree)
    leaves = [node for node in range(len(tree)) if not children[node]]
    found = paths(tree)
    assert [path[-1] for path in found] == leaves  # in leaf order, each leaf once
    for path in found:
        assert path == path_to(tree, path[-1])
        assert tree.parents[path[0]] == -1
    covered = {node for path in found for node in path}
    assert covered == set(range(len(tree)))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(random_trees(), st.integers(0, 1000))
def test_depth_is_path_length(tree, root_position):
    node_depths = depths(tree).tolist()
    assert node_depths == [len(path_to(tree, node)) for node in range(len(tree))]
    assert position_ids(tree, root_position).tolist() == [root_position + d for d in node_depths]
    for node, parent in enumerate(tree.parents.tolist()):
        assert node_depths[node] == (1 if parent < 0 else node_depths[parent] + 1)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(random_trees())
def test_from_paths_rebuilds_a_tree_with_unique_tokens(tree):
    unique = tree_of(list(range(100, 100 + len(tree))), tree.parents.tolist())
    token_paths = [unique.tokens[path].tolist() for path in paths(unique)]
    rebuilt = DraftTree.from_paths(token_paths)
    assert len(rebuilt) == len(unique)

    def edges(t):
        tokens = t.tokens.tolist()
        return {(tokens[i], -1 if p < 0 else tokens[p]) for i, p in enumerate(t.parents.tolist())}

    assert edges(rebuilt) == edges(unique)


# --------------------------------------------------------------------------------------------------- ngram drafter


def context(token_ids, max_nodes=64, max_depth=8):
    return DraftContext(list(token_ids), Budget(max_nodes=max_nodes, max_depth=max_depth), SamplingParams(),
                        TargetView(vocab_size=100, device=torch.device("cpu")))


def token_paths(tree):
    return [tree.tokens[path].tolist() for path in paths(tree)]


def test_ngram_two_continuations_make_a_branching_tree():
    # "1 2 3" is followed once by "7 8 9" and later by "4 5 6"; the context ends in "1 2 3"
    ctx = [1, 2, 3, 7, 8, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    tree = NgramDrafter(max_n=3, min_n=3, max_matches=4).propose(context(ctx, max_depth=3))
    assert token_paths(tree) == [[4, 5, 6], [7, 8, 9]]  # most recent first
    assert tree.parents.tolist() == [-1, 0, 1, -1, 3, 4]
    assert tree.source == ("ngram",) * 6


def test_ngram_continuation_runs_into_the_suffix():
    ctx = [1, 2, 3, 4, 1, 2, 3]
    tree = NgramDrafter(max_n=3, min_n=3).propose(context(ctx, max_depth=8))
    assert token_paths(tree) == [[4, 1, 2, 3]]  # what followed the earlier "1 2 3", up to the context's end


def test_ngram_longest_match_first():
    # suffix "5 6": the 2-gram "5 6" was followed by 30 (old); the 1-gram "6" was followed by 40 (more recent)
    ctx = [5, 6, 30, 31, 9, 6, 40, 41, 5, 6]
    tree = NgramDrafter(max_n=2, min_n=1, max_matches=4).propose(context(ctx, max_depth=2))
    assert token_paths(tree) == [[30, 31], [40, 41]]  # "6 30 31" again from the 1-gram: merged
    assert token_paths(NgramDrafter(max_n=2, min_n=1, max_matches=1).propose(context(ctx, max_depth=2))) == [[30, 31]]
    assert token_paths(NgramDrafter(max_n=1, min_n=1, max_matches=4).propose(context(ctx, max_depth=2))) == [
        [40, 41], [30, 31]]


def test_ngram_no_match_gives_an_empty_tree():
    drafter = NgramDrafter()
    assert len(drafter.propose(context([1, 2, 3, 4]))) == 0
    assert len(drafter.propose(context([7]))) == 0


def test_ngram_identical_continuations_are_merged():
    ctx = [1, 2, 9, 1, 2, 9, 1, 2]
    tree = NgramDrafter(max_n=2, min_n=2, max_matches=4).propose(context(ctx, max_depth=2))
    assert token_paths(tree) == [[9, 1]]


@pytest.mark.parametrize("max_nodes,max_depth", [(1, 8), (3, 2), (5, 3), (64, 1), (64, 4), (7, 7)])
def test_ngram_respects_the_budget(max_nodes, max_depth):
    rng = random.Random(max_nodes * 31 + max_depth)
    ctx = [rng.randrange(4) for _ in range(200)]  # 4 symbols: many matches with many continuations
    tree = NgramDrafter(max_n=3, max_matches=8).propose(context(ctx, max_nodes, max_depth))
    assert 0 < len(tree) <= max_nodes
    assert int(depths(tree).max()) <= max_depth
    full = NgramDrafter(max_n=3, max_matches=8).propose(context(ctx, 10_000, max_depth))
    assert full.tokens[:len(tree)].tolist() == tree.tokens.tolist()  # the cut keeps the best-ranked nodes


def test_ngram_max_matches_limits_branches():
    rng = random.Random(5)
    ctx = [rng.randrange(3) for _ in range(300)]
    for max_matches in (1, 2, 5):
        tree = NgramDrafter(max_n=2, max_matches=max_matches).propose(context(ctx, 1000, 6))
        assert 1 <= len(paths(tree)) <= max_matches
    assert len(paths(NgramDrafter(max_n=2, max_matches=1).propose(context(ctx, 1000, 6)))) == 1


def test_ngram_reset_reindexes():
    drafter = NgramDrafter(max_n=2, min_n=2)
    assert token_paths(drafter.propose(context([1, 2, 3, 1, 2], max_depth=1))) == [[3]]
    drafter.reset()
    assert token_paths(drafter.propose(context([1, 2, 8, 1, 2], max_depth=1))) == [[8]]
    # a context that is not an extension of the last one re-indexes even without reset()
    assert token_paths(drafter.propose(context([1, 2, 5, 1, 2], max_depth=1))) == [[5]]
    assert token_paths(drafter.propose(context([4, 4], max_depth=1))) == []


def test_ngram_incremental_equals_fresh():
    rng = random.Random(0)
    for trial in range(5):
        symbols = rng.choice([3, 5, 20])
        ctx = [rng.randrange(symbols) for _ in range(rng.randrange(1, 5))]
        incremental = NgramDrafter(max_n=3, min_n=1, max_matches=3)
        for _ in range(30):
            budget = dict(max_nodes=rng.randrange(1, 20), max_depth=rng.randrange(1, 7))
            grown = incremental.propose(context(ctx, **budget))
            fresh = NgramDrafter(max_n=3, min_n=1, max_matches=3).propose(context(ctx, **budget))
            assert grown.tokens.tolist() == fresh.tokens.tolist()
            assert grown.parents.tolist() == fresh.parents.tolist()
            ctx = ctx + [rng.randrange(symbols) for _ in range(rng.randrange(1, 6))]


def test_ngram_options_validated():
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(max_n=2, min_n=3)
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(min_n=0)
    with pytest.raises(ValueError, match="max_matches"):
        NgramDrafter(max_matches=0)


def test_host_parents_travel_with_the_tree_and_must_agree():
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8]])
    assert tree.host_parents == (-1, 0, 1, 0)
    assert tree.to("cpu").host_parents == tree.host_parents
    with pytest.raises(ValueError, match="host_parents must equal parents"):
        DraftTree(tree.tokens, tree.parents, host_parents=(-1, 0, 0, 0))
