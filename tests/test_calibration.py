"""Online calibration of the model drafters' tree scores (`drafters/calibration.py`): the estimate starts at the
draft's probability, moves to the measured acceptance rate of its (rank, probability) bin, counts only nodes the
target tested, and changes the tree's shape without changing the output."""

from __future__ import annotations

import copy

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.drafters.calibration import FLOOR, Calibration
from specdec.drafters.model import ModelDrafter
from specdec.reference import reference_decode
from specdec.backends.hf import HFBackend
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from tiny_models import fresh_tiny_model, repetitive_prompt, single_thread

VOCAB = 128


def test_the_estimate_starts_at_the_draft_probability_and_moves_to_the_measured_rate():
    calibration = Calibration(strength=8)
    assert [calibration.estimate(rank, p) for rank, p in [(0, 0.55), (1, 0.3), (7, 0.01)]] == [0.55, 0.3, 0.01]
    for step in range(400):  # a top token at 0.55 accepted 9 times in 10, a runner-up at 0.3 once in 10
        top_accepted, second_accepted = step % 10 != 0, step % 10 == 0
        calibration.observe([-1, -1], [(0, 0.55), (1, 0.3)], [0] if top_accepted else [1] if second_accepted else [])
    assert calibration.estimate(0, 0.52) == pytest.approx(0.9, abs=0.02)  # the same bin (0.5, 0.6]
    assert calibration.estimate(1, 0.3) == pytest.approx(0.1, abs=0.02)
    assert calibration.estimate(0, 0.75) == 0.75  # a bin it has not seen keeps the draft's probability
    assert calibration.estimate(2, 0.3) == 0.3  # so does a rank it has not seen


def test_only_nodes_whose_parent_was_accepted_are_counted():
    calibration = Calibration()
    # root -> 0 (rank 0), 1 (rank 1); 0 -> 2 (rank 0); 2 -> 3 (rank 0); 1 -> 4 (rank 0). Accepted: 0, 2.
    parents, ranks = [-1, -1, 0, 2, 1], [(0, 0.65), (1, 0.25), (0, 0.65), (0, 0.65), (0, 0.65)]
    calibration.observe(parents, ranks, [0, 2])
    top, second = calibration._cell(0, 0.65), calibration._cell(1, 0.25)
    assert (calibration.tested[top], calibration.accepted[top]) == (3, 2)  # 0, 2 accepted; 3 tested, rejected
    assert (calibration.tested[second], calibration.accepted[second]) == (1, 0)  # 4's parent was rejected: untested
    assert calibration.tested.sum() == 4


def test_estimates_stay_in_zero_one_so_a_child_never_outscores_its_parent():
    calibration = Calibration(strength=0.5)
    for _ in range(50):
        calibration.observe([-1], [(0, 0.99)], [0])
        calibration.observe([-1], [(1, 0.001)], [])
    assert calibration.estimate(0, 0.99) <= 1.0 and calibration.estimate(1, 0.001) >= FLOOR > 0
    with pytest.raises(ValueError, match="strength"):
        Calibration(strength=0)


def test_a_calibrated_tree_learns_from_its_own_trees_and_keeps_the_output():
    """Greedy output equals the reference with and without calibration; only the tree drafter's own verified trees
    are counted (a chain calibrates too, for confidence stops, unless calibrate=False)."""
    with single_thread():
        torch.manual_seed(0)
        target = fresh_tiny_model("llama", vocab=VOCAB, layers=2, init_range=0.1)
        with torch.no_grad():
            target.get_output_embeddings().weight.mul_(4.0)
        draft, noise = copy.deepcopy(target), torch.Generator().manual_seed(1)  # a drafter that mostly agrees
        with torch.no_grad():
            for weight in draft.parameters():
                weight.add_(torch.randn(weight.shape, generator=noise, dtype=weight.dtype) * 0.15 * weight.std())
        prompts = [repetitive_prompt(VOCAB, seed=seed) for seed in range(3)]
        truths = [reference_decode(HFBackend(target), p, SamplingParams(), StopRule(32)) for p in prompts]
        controller = "static:max_depth=5,max_nodes=10"
        taus = {}
        for calibrate in (True, False):
            drafter = ModelDrafter(draft, mode="tree", calibrate=calibrate)
            generator = SpeculativeGenerator(target, drafter=drafter, controller=controller)
            new = forwards = 0
            for prompt, truth in zip(prompts, truths):
                out = generator.generate(prompt, max_new_tokens=32)
                assert out.token_ids == truth and out.stats.drafter_errors == 0
                new, forwards = new + out.stats.new_tokens, forwards + out.stats.target_forwards
            taus[calibrate] = new / forwards
            if calibrate:
                tested = drafter.calibration.tested.sum()
                assert tested >= forwards * 2  # each step tests the root's children (>= 2 of them here)
                assert drafter.calibration.accepted.sum() == new - forwards  # every accepted draft token, once
            else:
                assert drafter.calibration is None
        assert ModelDrafter(draft, mode="chain").calibration is not None
        assert ModelDrafter(draft, mode="chain", calibrate=False).calibration is None
        print(f"tau calibrated {taus[True]:.2f}, uncalibrated {taus[False]:.2f}")
        assert min(taus.values()) > 1.3  # drafts were accepted: the calibration saw both outcomes
