"""`fused`: trie merging of several drafters' trees under one budget (shared nodes once, sources kept, both budget
policies), failing sub-drafters, per-source statistics, vocabularies, and greedy output == the reference decoder
(tiny Llama / Qwen2, the real stories260K)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.backends.hf import HFBackend
from specdec.controllers import Budget
from specdec.drafters.base import DraftContext, TargetView, make_drafter
from specdec.drafters.fused import FusedDrafter, merge_trees
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.retrieval import RetrievalDrafter, build_datastore
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from specdec.tree import DraftTree, depths
from specdec.verify import VerifyResult
from tiny_models import VOCAB, repetitive_prompt, tiny_model

GREEDY = SamplingParams()



class Scripted:
    """Proposes fixed paths (a trie); records what it was told."""

    vocab_size = None

    def __init__(self, name, paths, vocab_size=None):
        self.name, self.paths, self.vocab_size = name, paths, vocab_size
        self.observed, self.resets = [], 0

    def propose(self, ctx):
        return DraftTree.from_paths(self.paths, source=self.name)

    def observe(self, result):
        self.observed.append(result)

    def reset(self):
        self.resets += 1


class Broken(Scripted):
    def propose(self, ctx):
        raise RuntimeError("broken drafter")

    def observe(self, result):
        raise RuntimeError("broken drafter")


def context(max_nodes=16, max_depth=6):
    return DraftContext([1, 2, 3], Budget(max_nodes, max_depth), GREEDY, TargetView(VOCAB, torch.device("cpu")))


def tree_tuple(tree):
    return tree.tokens.tolist(), tree.parents.tolist(), list(tree.source)


def result_for(tree, accepted_nodes):
    tokens = tree.tokens.tolist()
    return VerifyResult(tree, list(accepted_nodes), [tokens[n] for n in accepted_nodes], 0,
                        torch.zeros(len(tree) + 1, VOCAB))


A_PATHS, B_PATHS = [[1, 2, 3], [1, 4]], [[1, 2, 5], [6]]  # a: 1 2 3 / 1 4;  b: 1 2 5 / 6


def test_priority_merge_shares_prefixes_and_keeps_sources():
    fused = FusedDrafter([Scripted("a", A_PATHS), Scripted("b", B_PATHS)])
    assert tree_tuple(fused.propose(context(max_nodes=5))) == (
        [1, 2, 3, 4, 5], [-1, 0, 1, 0, 1], ["a+b", "a+b", "a", "a", "b"])
    assert tree_tuple(fused.propose(context(max_nodes=4))) == ([1, 2, 3, 4], [-1, 0, 1, 0], ["a+b", "a+b", "a", "a"])
    assert tree_tuple(fused.propose(context(max_nodes=99))) == (
        [1, 2, 3, 4, 5, 6], [-1, 0, 1, 0, 1, -1], ["a+b", "a+b", "a", "a", "b", "b"])
    swapped = FusedDrafter([Scripted("b", B_PATHS), Scripted("a", A_PATHS)])
    assert tree_tuple(swapped.propose(context(max_nodes=4))) == ([1, 2, 5, 6], [-1, 0, 1, -1],
                                                                 ["b+a", "b+a", "b", "b"])


def test_merge_respects_depth_and_drops_orphans():
    trees = {"a": DraftTree.from_paths([[1, 2, 3, 4]]), "b": DraftTree.from_paths([[1, 2, 7, 8], [9]])}
    merged = merge_trees(trees, max_nodes=99, max_depth=3)
    assert tree_tuple(merged) == ([1, 2, 3, 7, 9], [-1, 0, 1, 1, -1], ["a+b", "a+b", "a", "b", "b"])
    assert int(depths(merged).max()) == 3
    merged = merge_trees(trees, max_nodes=3)  # b's 8 lost its parent 7 to the budget: dropped too
    assert tree_tuple(merged) == ([1, 2, 3], [-1, 0, 1], ["a+b", "a+b", "a"])
    assert len(merge_trees({}, max_nodes=8)) == 0


def test_merged_tree_keeps_the_leading_trees_match_length():
    """A copying drafter's match length (the controllers' acceptance class) survives the merge where its tree
    leads; where it found nothing, the tree that leads gives its own (0: none)."""
    copied = DraftTree.from_paths([[1, 2, 3]], match_len=5)
    other = DraftTree.from_paths([[1, 4], [6]])
    assert merge_trees({"copy": copied, "other": other}, max_nodes=8).match_len == 5
    assert merge_trees({"other": other, "copy": copied}, max_nodes=8).match_len == 0
    assert merge_trees({"other": other}, max_nodes=8).match_len == 0
    assert merge_trees({"copy": copied, "other": other}, max_nodes=8, interleave=True).match_len == 5
    assert merge_trees({}, max_nodes=8).match_len == 0


def test_acceptance_policy_interleaves_by_recent_acceptance():
    a, b = Scripted("a", A_PATHS), Scripted("b", B_PATHS)
    fused = FusedDrafter([a, b], policy="acceptance")
    tree = fused.propose(context(max_nodes=4))  # no history: round-robin in list order
    assert tree_tuple(tree) == ([1, 2, 3, 5], [-1, 0, 1, 1], ["a+b", "a+b", "a", "b"])
    fused.observe(result_for(tree, [0, 1, 3]))  # b's 5 was accepted: b drafted 3 accepted tokens, a 2
    assert tree_tuple(fused.propose(context(max_nodes=4))) == ([1, 2, 5, 3], [-1, 0, 1, 1],
                                                               ["a+b", "a+b", "b", "a"])
    assert FusedDrafter([a, b]).propose(context(max_nodes=4)).tokens.tolist() == [1, 2, 3, 4]  # priority ignores it


def test_source_stats_count_proposed_and_accepted_tokens():
    a, b = Scripted("a", A_PATHS), Scripted("b", B_PATHS)
    fused = FusedDrafter([a, b])
    tree = fused.propose(context(max_nodes=5))  # sources a+b, a+b, a, a, b
    fused.observe(result_for(tree, [0, 1, 2]))
    fused.observe(result_for(tree, [0, 3]))
    stats = fused.source_stats()
    assert (stats["a"].proposed, stats["a"].accepted) == (8, 5)
    assert (stats["b"].proposed, stats["b"].accepted) == (6, 3)
    assert stats["a"].acceptance_rate == 5 / 8 and stats["b"].errors == 0
    assert len(a.observed) == len(b.observed) == 2 and a.observed[0].tree is tree  # forwarded, merged tree
    fused.reset()
    assert a.resets == b.resets == 1
    stats["a"].accepted = 99
    assert fused.source_stats()["a"].accepted == 5  # a copy


def test_a_raising_sub_drafter_is_skipped():
    good = Scripted("good", [[4, 5]])
    fused = FusedDrafter([Broken("broken", []), good])
    tree = fused.propose(context())
    assert tree_tuple(tree) == ([4, 5], [-1, 0], ["good", "good"])
    fused.observe(result_for(tree, [0]))
    assert len(good.observed) == 1
    stats = fused.source_stats()
    assert stats["broken"].errors == 2 and stats["good"].errors == 0 and stats["good"].accepted == 1
    assert len(FusedDrafter([Broken("x", []), Broken("y", [])]).propose(context())) == 0


def test_specs_names_and_vocabularies():
    fused = make_drafter("fused:drafters=ngram:max_n=4+ngram:max_n=2")
    assert fused.names == ["ngram", "ngram#2"] and [d.max_n for d in fused.drafters] == [4, 2]
    assert fused.vocab_size is None
    assert FusedDrafter([Scripted("s", [], vocab_size=300), "ngram"]).vocab_size == 300
    with pytest.raises(ValueError, match="disagree on the vocabulary"):
        FusedDrafter([Scripted("s", [], vocab_size=300), Scripted("t", [], vocab_size=256)])
    with pytest.raises(ValueError, match="policy must be"):
        FusedDrafter("ngram", policy="random")
    with pytest.raises(ValueError, match="unknown drafter"):
        FusedDrafter("ngram+nope")
    assert FusedDrafter([Scripted("a+b", [])]).names == ["a_b"]


# ------------------------------------------------------------------------------------- greedy == the reference

def greedy(model, prompt, length, eos=None):
    rule = StopRule(length, eos_token_ids=frozenset([eos]) if eos is not None else frozenset())
    return reference_decode(HFBackend(model), list(prompt), GREEDY, rule)


class Recording(FusedDrafter):
    def __init__(self, drafters, **options):
        super().__init__(drafters, **options)
        self.trees = []

    def propose(self, ctx):
        self.trees.append(super().propose(ctx))
        return self.trees[-1]


def check_greedy(model, fused, prompts, length, eos=None, controller="static:max_depth=6,max_nodes=16"):
    """Asserts every output equals the reference decoder's; returns tau over all prompts."""
    generator = SpeculativeGenerator(model, drafter=fused, controller=controller)
    forwards = new_tokens = 0
    for prompt in prompts:
        out = generator.generate(prompt, max_new_tokens=length)
        assert out.token_ids == greedy(model, prompt, length, eos) and out.stats.drafter_errors == 0
        forwards, new_tokens = forwards + out.stats.target_forwards, new_tokens + out.stats.new_tokens
    return new_tokens / forwards


@pytest.mark.parametrize("policy", ["priority", "acceptance"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_greedy_equals_reference(arch, policy):
    fused = Recording([NgramDrafter(max_n=4), NgramDrafter(max_n=2, max_matches=1), Broken("broken", [])],
                      policy=policy)
    prompts = [repetitive_prompt(VOCAB, seed=seed) for seed in range(3)]
    assert check_greedy(tiny_model(arch), fused, prompts, 40) > 1.2
    stats = fused.source_stats()
    assert stats["ngram"].accepted > 0 and stats["broken"].errors > 0
    assert any("ngram+ngram#2" in (tree.source or ()) for tree in fused.trees)  # merged nodes happened


def test_stories_greedy_equals_reference(tmp_path, stories_model):
    """ngram + a datastore of the model's own story: the datastore's nodes get accepted too."""
    story = greedy(stories_model, [1], 80, eos=2)
    path = build_datastore([[1] + story], tmp_path / "story.ds", 512)
    fused = Recording(["ngram:max_n=3", RetrievalDrafter(datastore=path, max_candidates=8)], policy="acceptance")
    prompts = [[1] + story[:10], [1] + story[40:55]]
    tau = check_greedy(stories_model, fused, prompts, 50, eos=2, controller="heuristic")
    stats = fused.source_stats()
    assert tau > 2 and stats["retrieval"].accepted > stats["ngram"].accepted > 0, (tau, stats)
    assert np.mean([len(tree) for tree in fused.trees]) > 1
