"""The cost stop of the model drafters (`drafters/cost_stop.py`): one more depth is drafted iff its expected tokens
g > t_d · τ / T; before it has measured τ, T and t_d it drafts every depth; it cuts trees without changing output."""

from __future__ import annotations

from collections import Counter

import pytest

from specdec import SpeculativeGenerator
from specdec.backends.hf import HFBackend
from specdec.controllers import Budget
from specdec.drafters.cost_stop import CostStop
from specdec.drafters.model import ModelDrafter
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from test_model_drafter import (ALPHA, PROMPTS, A, B, C, bigram, draft_model, exact_first_two, first_two_counts,
                                noisy_copy, propose, small_target, target)
from tiny_models import chi_square_p_value, single_thread


def measured(tau: float, step: float, depth: float) -> CostStop:
    cost = CostStop(decay=0.0)  # no memory: each value is the last observed
    cost.observe(int(tau) - 1)
    cost.step_started(10.0)
    cost.step_started(10.0 + step)
    cost.depth_ran(depth)
    return cost


def test_a_depth_is_worth_drafting_iff_its_tokens_outweigh_its_time():
    cost = measured(tau=2, step=1.0, depth=0.1)  # break-even at g = 0.1 * 2 / 1.0 = 0.2
    assert cost.worth(0.3) and not cost.worth(0.1)
    assert CostStop().worth(0.0)  # nothing measured yet: draft
    cost.new_sequence()  # the gap to the next sequence's first step holds a prefill: not a step period
    cost.step_started(99.0)
    assert cost.step_seconds == 1.0
    with pytest.raises(ValueError, match="decay"):
        CostStop(decay=1.0)


def test_running_averages_weigh_the_old_value_by_decay():
    cost = CostStop(decay=0.5)
    for accepted in (3, 1):
        cost.observe(accepted)
    assert cost.tau == pytest.approx(0.5 * 4 + 0.5 * 2)


def test_the_tree_stops_where_a_depth_costs_more_than_it_saves():
    """The bigram drafter's tree: with a draft forward as dear as a whole step, no depth pays and the tree is the
    root's children; with one 1000 x cheaper every depth is drafted (as without the stop)."""
    model = bigram()
    drafter = ModelDrafter(model, topk=2, calibrate=False, cost_stop=True)
    drafter.cost = measured(tau=2, step=1.0, depth=1.0)  # break-even g = 2: the frontier's scores sum to .9
    tree = propose(drafter, Budget(max_nodes=3, max_depth=4))
    assert tree.tokens.tolist() == [A, B] and len(model.inputs) == 1  # the prefill only: no frontier forward
    drafter = ModelDrafter(model, topk=2, calibrate=False, cost_stop=True)
    drafter.cost = measured(tau=2, step=1.0, depth=0.001)
    assert propose(drafter, Budget(max_nodes=3, max_depth=4)).tokens.tolist() == [A, B, C]
    assert drafter.cost.depth_seconds != 0.001  # the frontier forward was timed


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_output_is_unchanged_by_the_stop(mode):
    with single_thread():
        drafter = ModelDrafter(draft_model("noisy"), mode=mode, cost_stop=True)
        generator = SpeculativeGenerator(target(), drafter=drafter, controller="static:max_depth=6,max_nodes=12")
        for prompt in PROMPTS:
            out = generator.generate(list(prompt), max_new_tokens=30)
            assert out.token_ids == reference_decode(HFBackend(target()), list(prompt), SamplingParams(),
                                                     StopRule(30))
        assert None not in (drafter.cost.tau, drafter.cost.step_seconds, drafter.cost.depth_seconds)


class ScoreCut(CostStop):
    """A stop that learns nothing: a depth is drafted iff the frontier's expected tokens exceed `cut`."""

    def __init__(self, cut: float):
        super().__init__()
        self.cut, self.decisions = cut, []

    def step_started(self, now: float) -> None: ...
    def depth_ran(self, seconds: float) -> None: ...
    def observe(self, accepted: int) -> None: ...

    def worth(self, gain: float) -> bool:
        self.decisions.append(bool(gain > self.cut))
        return self.decisions[-1]


def test_sampled_drafts_cut_by_the_stop_keep_the_target_distribution():
    """Whether depth 2 is drafted depends on the frontier's scores, never on its tokens: the first two sampled tokens
    keep the target's joint distribution (chi-square), with both outcomes of the stop in the run."""
    options = dict(temperature=1.0)
    drafter = ModelDrafter(noisy_copy(small_target(), 0.5), topk=3, cost_stop=True)
    drafter.cost = ScoreCut(0.3)
    counts, accepted = first_two_counts(drafter, options, 1500)
    assert set(drafter.cost.decisions) == {True, False}, Counter(drafter.cost.decisions)  # the stop cut some trees
    assert {0, 1, 2} <= set(accepted)
    joint = exact_first_two(SamplingParams(**options))
    p_values = [chi_square_p_value(counts, joint), chi_square_p_value(counts.sum(1), joint.sum(1)),
                chi_square_p_value(counts.sum(0), joint.sum(0))]
    assert min(p_values) > ALPHA, p_values
