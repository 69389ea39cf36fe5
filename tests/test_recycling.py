"""Token Recycling: the adjacency-matrix update from hand-built logits, the template walk on a hand-filled matrix,
budget cuts, persistence across sequences, memory; greedy output == the reference decoder on tiny models and on
stories260K; a sampled run."""

from __future__ import annotations


import pytest
import torch

import specdec.drafters.recycling  # noqa: F401  (registers "recycling")
from specdec import SpeculativeGenerator
from specdec.controllers import Budget
from specdec.drafters import DraftContext, TargetView, make_drafter
from specdec.drafters.recycling import PRESETS, RecyclingDrafter, TemplateShape, check_template
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree
from specdec.verify import VerifyResult
from tiny_models import VOCAB, greedy_tau_on_tiny, greedy_truth, repetitive_prompt, tiny_model

GREEDY = SamplingParams()
CPU = torch.device("cpu")
STORY_BOS, STORY_EOS = 1, 2


def context(token_ids, vocab=16, max_nodes=64, max_depth=8, device=CPU):
    return DraftContext(list(token_ids), Budget(max_nodes, max_depth), GREEDY, TargetView(vocab, device))


def result(tree_tokens, tree_parents, logits, accepted_nodes, bonus_token=0):
    tree = DraftTree(torch.tensor(tree_tokens, dtype=torch.long), torch.tensor(tree_parents, dtype=torch.long))
    return VerifyResult(tree, list(accepted_nodes), [tree_tokens[n] for n in accepted_nodes], bonus_token, logits)


def distinct_logits(rows, vocab=16, seed=0):
    """(rows, vocab) logits without ties, so each row has one top-k."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=generator).double() for _ in range(rows)])


def filled(rows: dict[int, list[int]], k=3, vocab=16, template="auto") -> RecyclingDrafter:
    """A drafter whose matrix holds exactly `rows` (the rest unknown)."""
    drafter = RecyclingDrafter(k=k, template=template)
    drafter.propose(context([0], vocab))  # allocates; one token gives nothing to seed
    for token, successors in rows.items():
        drafter.successors[token] = torch.tensor(successors + [-1] * (k - len(successors)), dtype=torch.int32)
    return drafter


# ----------------------------------------------------------------------------------------------- matrix updates

def test_observe_sets_rows_to_topk_of_logits():
    drafter = RecyclingDrafter(k=3)
    drafter.propose(context([9, 3]))  # root 3
    logits = distinct_logits(3)
    drafter.observe(result([4, 5], [-1, 0], logits, accepted_nodes=[0], bonus_token=11))
    for token, row in ((3, 0), (4, 1), (5, 2)):  # root row, accepted node, rejected node
        assert drafter.successors[token].tolist() == logits[row].topk(3).indices.tolist()
    # the bonus token is the next root, even when no propose() comes before the next observe()
    more = distinct_logits(1, seed=1)
    drafter.observe(result([], [], more, accepted_nodes=[], bonus_token=2))
    assert drafter.successors[11].tolist() == more[0].topk(3).indices.tolist()


@pytest.mark.parametrize("accepted", [0, 1])
def test_repeated_token_takes_the_accepted_row(accepted):
    drafter = RecyclingDrafter(k=2)
    drafter.propose(context([3]))
    logits = distinct_logits(3, seed=2)
    drafter.observe(result([7, 7], [-1, -1], logits, accepted_nodes=[accepted]))
    assert drafter.successors[7].tolist() == logits[1 + accepted].topk(2).indices.tolist()


def test_seeding_fills_unknown_rows_from_the_context_most_recent_first():
    drafter = RecyclingDrafter(k=3)
    drafter.propose(context([1, 2, 3, 1, 4, 1, 2]))
    assert drafter.successors[1].tolist() == [2, 4, -1]
    assert drafter.successors[2].tolist() == [3, -1, -1]
    logits = distinct_logits(1)
    drafter.observe(result([], [], logits, accepted_nodes=[]))  # the target scores root 2
    drafter.propose(context([1, 2, 3, 1, 4, 1, 2, 5, 2, 6]))  # new pairs must not overwrite what the target said
    assert drafter.successors[2].tolist() == logits[0].topk(3).indices.tolist()
    assert drafter.successors[5].tolist() == [2, -1, -1]


# ------------------------------------------------------------------------------------------------ template walk

TEMPLATE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0)]
ROWS = {5: [7, 9, 2], 7: [3, 8], 9: [7, 7]}  # root 5; row 9 repeats 7 (siblings are deduplicated); 3 unknown


def test_walk_builds_the_expected_tree():
    drafter = filled(ROWS, template=TEMPLATE)
    tree = drafter.propose(context([5]))
    assert tree.tokens.tolist() == [7, 9, 2, 3, 8, 7]
    assert tree.parents.tolist() == [-1, -1, -1, 0, 0, 1]
    assert tree.draft_probs is None and tree.source == ("recycling",) * 6


@pytest.mark.parametrize("max_nodes, max_depth, tokens, parents", [
    (4, 8, [7, 9, 2, 3], [-1, -1, -1, 0]),
    (64, 1, [7, 9, 2], [-1, -1, -1]),
    (0, 8, [], []),
])
def test_walk_respects_the_budget(max_nodes, max_depth, tokens, parents):
    tree = filled(ROWS, template=TEMPLATE).propose(context([5], max_nodes=max_nodes, max_depth=max_depth))
    assert tree.tokens.tolist() == tokens and tree.parents.tolist() == parents


def test_unknown_root_gives_an_empty_tree():
    assert len(RecyclingDrafter().propose(context([5]))) == 0


def test_presets_are_valid_trees_chosen_by_device():
    drafter = RecyclingDrafter()
    cpu, gpu = drafter.template_for(CPU), drafter.template_for(torch.device("cuda"))
    assert len(cpu) == PRESETS["cpu"].nodes == 16 and len(gpu) == PRESETS["gpu"].nodes == 80
    for template, shape in ((cpu, PRESETS["cpu"]), (gpu, PRESETS["gpu"])):
        assert check_template(template, 8) == template  # every path's parent comes first, ranks < k
        assert max(map(len, template)) <= shape.depth and max(max(p) for p in template) < shape.max_width
        assert len(set(template)) == len(template)
    assert RecyclingDrafter(template="gpu").template_for(CPU) == gpu
    assert len(make_drafter("recycling:nodes=30").template_for(CPU)) == 30
    assert TemplateShape(nodes=3, max_width=2, depth=4).paths() == [(0,), (0, 0), (1,)]


def test_bad_templates_are_refused():
    with pytest.raises(ValueError, match="parent path"):
        RecyclingDrafter(k=3, template=[(0,), (1, 0)])
    with pytest.raises(ValueError, match="k=3"):
        RecyclingDrafter(k=3, template=[(3,)])
    with pytest.raises(ValueError, match="k=2"):
        RecyclingDrafter(k=2, max_width=4)  # a user's width must fit k; a preset's is narrowed to it
    assert max(max(path) for path in RecyclingDrafter(k=2).template_for(CPU)) == 1
    with pytest.raises(ValueError, match="presets"):
        RecyclingDrafter(template="tpu")


# ------------------------------------------------------------------------------------- persistence and memory

def test_matrix_persists_across_reset_until_clear():
    drafter = filled(ROWS, template=TEMPLATE)
    logits = distinct_logits(1)
    drafter.propose(context([4]))
    drafter.observe(result([], [], logits, accepted_nodes=[]))
    drafter.reset()
    assert drafter.propose(context([8, 5])).tokens.tolist() == [7, 9, 2, 3, 8, 7]
    assert drafter.successors[4].tolist() == logits[0].topk(3).indices.tolist()
    drafter.propose(context([5], vocab=20))  # another target's vocabulary: a fresh matrix
    assert drafter.successors.shape == (20, 3) and (drafter.successors == -1).all()
    drafter.clear()
    assert drafter.successors is None and drafter.memory_bytes == 0


def test_memory_is_v_times_k_int32_on_the_cpu():
    drafter = RecyclingDrafter(k=8)
    drafter.propose(context([1], vocab=32000))
    assert drafter.successors.dtype == torch.int32 and drafter.successors.device.type == "cpu"
    assert drafter.memory_bytes == 32000 * 8 * 4 + 32000 < 2 ** 21  # 1.06 MB, under the design's 2 MB


# ---------------------------------------------------------------------------------- greedy == reference decoder

SETUPS = {  # drafter, controller
    "cpu-static": ("recycling", "static:max_depth=6,max_nodes=16"),
    "cpu-heuristic": ("recycling", "heuristic:start_depth=4,max_depth=8"),
    "gpu-static": ("recycling:template=gpu", "static:max_depth=8,max_nodes=48"),
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_reference_tiny(arch, setup):
    drafter, controller = SETUPS[setup]
    greedy_tau_on_tiny(tiny_model(arch), drafter, controller)


def test_greedy_equals_reference_stories(stories_model):
    story = greedy_truth(stories_model, (STORY_BOS,), 48, STORY_EOS)  # also the reference for the prompt [BOS]
    generator = SpeculativeGenerator(stories_model, drafter="recycling", controller="static:max_depth=6,max_nodes=16")
    forwards = new_tokens = 0
    for prompt in ([STORY_BOS], [STORY_BOS] + story[:24], [STORY_BOS] + story[:30] * 2):
        out = generator.generate(prompt, max_new_tokens=48)
        assert out.token_ids == greedy_truth(stories_model, tuple(prompt), 48, STORY_EOS)
        assert out.stats.drafter_errors == 0
        forwards, new_tokens = forwards + out.stats.target_forwards, new_tokens + out.stats.new_tokens
    assert new_tokens / forwards > 1.3  # the matrix, kept across prompts, predicts the model's own text


def test_sampling_completes_with_valid_ids():
    model = tiny_model("qwen2")
    generator = SpeculativeGenerator(model, drafter=make_drafter("recycling"),
                                     controller="static:max_depth=4,max_nodes=12")
    out = generator.generate(repetitive_prompt(VOCAB, seed=5), max_new_tokens=30, temperature=0.8, seed=7)
    assert len(out.token_ids) == 30 and all(0 <= t < VOCAB for t in out.token_ids)
    assert out.stats.drafter_errors == 0 and out.stats.drafted_nodes > 0
