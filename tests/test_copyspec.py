"""CopySpec: hits across chat turns, span length, branches for several hits, the adaptive copy length, no hit ->
empty tree; greedy output == the reference decoder on tiny models and on stories260K; a sampled run."""

from __future__ import annotations


import pytest
import torch

import specdec.drafters.copyspec  # noqa: F401  (registers "copyspec")
from specdec import SpeculativeGenerator
from specdec.controllers import Budget
from specdec.drafters import DraftContext, TargetView, make_drafter
from specdec.drafters.copyspec import CopySpecDrafter
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree, paths
from specdec.verify import VerifyResult
from tiny_models import VOCAB, greedy_tau_on_tiny, greedy_truth, repetitive_prompt, tiny_model

GREEDY = SamplingParams()
STORY_BOS, STORY_EOS = 1, 2


def context(token_ids, max_nodes=64, max_depth=64):
    return DraftContext(list(token_ids), Budget(max_nodes, max_depth), GREEDY, TargetView(1000, torch.device("cpu")))


def drafted(tree: DraftTree) -> list[list[int]]:
    tokens = tree.tokens.tolist()
    return [[tokens[node] for node in path] for path in paths(tree)]


def result(tree: DraftTree, accepted_len: int) -> VerifyResult:
    """The first path of `tree` accepted up to `accepted_len` tokens."""
    nodes = paths(tree)[0][:accepted_len] if accepted_len else []
    tokens = tree.tokens.tolist()
    return VerifyResult(tree, nodes, [tokens[n] for n in nodes], 0, torch.zeros(len(tree) + 1, 4))


# chat turns as token ids: turn 1 asks Q1 and gets the answer A1; turn 2 quotes the answer's start
Q1, A1, Q2 = list(range(100, 110)), list(range(200, 240)), [300, 301, 302]


def test_hit_across_turns_copies_the_earlier_answer():
    drafter = CopySpecDrafter(gamma=3, copy_len=16)
    turn1 = Q1 + A1
    assert len(drafter.propose(context(turn1))) == 0  # no γ-gram repeats yet
    drafter.reset()  # the next turn is a new sequence whose prompt holds the first one
    turn2 = turn1 + Q2 + A1[:3]
    tree = drafter.propose(context(turn2))
    assert drafted(tree) == [A1[3:19]]
    assert tree.draft_probs is None and tree.source == ("copyspec",) * 16


def test_index_grows_with_the_sequence_and_is_rebuilt_for_another():
    drafter = CopySpecDrafter(gamma=2, copy_len=4)
    drafter.propose(context([1, 2, 3, 4, 5, 1]))
    assert drafted(drafter.propose(context([1, 2, 3, 4, 5, 1, 2]))) == [[3, 4, 5, 1]]
    drafter.reset()
    assert len(drafter.propose(context([9, 8, 1, 2]))) == 0  # an unrelated sequence: old hits are gone
    assert drafted(drafter.propose(context([9, 8, 1, 2, 7, 9, 8]))) == [[1, 2, 7, 9]]


@pytest.mark.parametrize("copy_len, max_depth, length", [(4, 64, 4), (16, 64, 16), (16, 5, 5), (64, 64, 33)])
def test_span_length_is_copy_len_capped_by_depth_and_text(copy_len, max_depth, length):
    text = list(range(400, 430)) + [7, 8, 9]  # 33 tokens follow the key's first occurrence: the context's end
    drafter = CopySpecDrafter(gamma=3, min_copy_len=4, copy_len=copy_len)
    tree = drafter.propose(context([7, 8, 9] + text, max_depth=max_depth))
    assert drafted(tree) == [text[:length]]


def test_several_hits_become_branches_most_recent_first():
    key = [7, 8, 9]
    ctx = key + [1, 1] + key + [2, 2] + key + [1, 1] + key + [3, 3] + key + [4, 4] + key
    tree = CopySpecDrafter(gamma=3, copy_len=4, max_branches=3).propose(context(ctx))
    assert drafted(tree) == [[4, 4, 7, 8], [3, 3, 7, 8], [1, 1, 7, 8]]
    assert tree.parents.tolist().count(-1) == 3
    repeats = key + [2, 2] + key + [1, 1] + key + [3, 3] + key + [1, 1] + key
    tree = CopySpecDrafter(gamma=3, copy_len=2, min_copy_len=2, max_branches=3).propose(context(repeats))
    assert drafted(tree) == [[1, 1], [3, 3], [2, 2]]  # the span [1, 1] seen twice counts once
    # the trie shares prefixes and the node budget cuts the later branches
    cut = CopySpecDrafter(gamma=3, copy_len=4, max_branches=3).propose(context(ctx, max_nodes=6))
    assert drafted(cut) == [[4, 4, 7, 8], [3, 3]]


def test_copy_length_grows_after_full_acceptance_and_shrinks_after_rejection():
    text = list(range(400, 500))
    ctx = [7, 8, 9] + text + [7, 8, 9]
    drafter = CopySpecDrafter(gamma=3, copy_len=8, min_copy_len=4, max_copy_len=32)
    lengths = []
    for accepted in ("all", "all", "all", 3, 0, 0, "all"):
        tree = drafter.propose(context(ctx))
        lengths.append(len(tree))
        drafter.observe(result(tree, len(tree) if accepted == "all" else accepted))
    assert lengths == [8, 16, 32, 32, 16, 8, 4]
    assert drafter.copy_len == 8
    drafter.observe(result(DraftTree.empty(), 0))  # nothing drafted: no evidence either way
    assert drafter.copy_len == 8


def test_no_hit_gives_an_empty_tree():
    drafter = CopySpecDrafter(gamma=3)
    assert len(drafter.propose(context([1, 2]))) == 0  # shorter than γ
    assert len(drafter.propose(context([1, 2, 3, 4, 5, 6, 2, 3]))) == 0  # only a 2-token repeat
    assert len(drafter.propose(context([5, 5, 5]))) == 0  # the key occurs only as the suffix itself
    assert len(drafter.propose(context([1, 2, 3, 4, 1, 2, 3], max_depth=0))) == 0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="gamma"):
        CopySpecDrafter(gamma=0)
    with pytest.raises(ValueError, match="min_copy_len <= copy_len"):
        CopySpecDrafter(copy_len=100, max_copy_len=64)


# ---------------------------------------------------------------------------------- greedy == reference decoder

@pytest.mark.parametrize("controller", ["static:max_depth=12,max_nodes=24", "heuristic:start_depth=4,max_depth=16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_reference_tiny(arch, controller):
    greedy_tau_on_tiny(tiny_model(arch), "copyspec:gamma=2,copy_len=8", controller)


def test_greedy_equals_reference_stories(stories_model):
    story = greedy_truth(stories_model, (STORY_BOS,), 48, STORY_EOS)  # also the reference for the prompt [BOS]
    generator = SpeculativeGenerator(stories_model, drafter="copyspec", controller="heuristic")
    # a second "turn" that starts retelling the first: the story is in the prompt and gets copied
    prompts = [[STORY_BOS], [STORY_BOS] + story[:40] + [STORY_BOS] + story[:12],
               [STORY_BOS] + story[:30] + [STORY_BOS] + story[:4]]
    forwards = new_tokens = 0
    for prompt in prompts:
        out = generator.generate(prompt, max_new_tokens=48)
        assert out.token_ids == greedy_truth(stories_model, tuple(prompt), 48, STORY_EOS)
        assert out.stats.drafter_errors == 0
        forwards, new_tokens = forwards + out.stats.target_forwards, new_tokens + out.stats.new_tokens
    assert new_tokens / forwards > 1.4


def test_sampling_completes_with_valid_ids():
    generator = SpeculativeGenerator(tiny_model("llama"), drafter=make_drafter("copyspec:gamma=2"),
                                     controller="static:max_depth=8,max_nodes=16")
    out = generator.generate(repetitive_prompt(VOCAB, seed=4), max_new_tokens=30, temperature=0.8, seed=3)
    assert len(out.token_ids) == 30 and all(0 <= t < VOCAB for t in out.token_ids)
    assert out.stats.drafter_errors == 0 and out.stats.drafted_nodes > 0


def test_copying_drafters_report_how_far_their_match_reaches_back():
    """`match_length`: the common suffix of tokens[:end] and the context (capped); `ngram` and `copyspec` put their
    first path's in `DraftTree.match_len` (a drafter's evidence for the controllers' acceptance classes)."""
    from specdec.drafters.base import match_length
    from specdec.drafters.ngram import NgramDrafter

    assert match_length([1, 2, 3, 9, 1, 2, 3], 3) == 3 and match_length([5, 2, 3, 9, 1, 2, 3], 3) == 2
    assert match_length([7, 7, 7, 7], 3, cap=2) == 2 and match_length([1, 2], 0) == 0
    context = [8, 1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3, 4]  # "1 2 3 4" occurred before, with "8" before it, not "9"
    budget = Budget(8, 4)
    tree = NgramDrafter(max_n=3).propose(DraftContext(context, budget, SamplingParams(), None))
    assert tree.host_tokens[:2] == (5, 6) and tree.match_len == 4  # the 3-gram "2 3 4", and "1" before it too
    tree = CopySpecDrafter(gamma=2).propose(DraftContext(context, budget, SamplingParams(), None))
    assert tree.host_tokens[:2] == (5, 6) and tree.match_len == 4
    nothing = NgramDrafter().propose(DraftContext([1, 2, 3], budget, SamplingParams(), None))
    assert len(nothing) == 0 and nothing.match_len == 0
