"""The SpecDec++ acceptance head (`specdec.train.acceptance_head`) and its controller (`acceptance_head`).

Pair: a peaky tiny float64 Llama target and a noisy copy of it as the draft (about half its greedy tokens are
accepted). Head files: round trip and every bad file. Data: labels and hidden rows against a direct per-position
computation. Training: held-out BCE falls, the probabilities come out calibrated (the class weight undone), ECE and
AUC on hand-made numbers, a resumed run equals an uninterrupted one; on stories260K (skipped when absent) the head
ranks acceptances better than the draft's own confidence. Controller: option errors, the stop rule on synthetic
heads (fixed h; derived h = CostAware's marginal rule), the hidden rows the model drafter hands it, and greedy
output equal to the reference decoder while the head cuts drafts.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import warnings

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.controllers import Budget, Frontier, StepStats, make_controller
from specdec.controllers.acceptance_head import AcceptanceHeadController
from specdec.controllers.cost import CostModel
from specdec.drafters import DraftContext, TargetView
from specdec.drafters.model import ModelDrafter
from specdec.sampling import SamplingParams
from specdec.train.acceptance_head import (AcceptanceHead, AcceptanceHeadConfig, TrainConfig, acceptance_examples,
                                           add_acceptance_head_parser, auc, checkpoint_path, continue_with_target,
                                           ece, evaluate, train_acceptance_head)
from test_model_drafter import noisy_copy, peaky
from tiny_models import (ALPHABET, fresh_tiny_model, greedy_truth, repetitive_prompt, single_thread,
                         tiny_tokenizer)

VOCAB = 128
PROMPTS = [tuple(repetitive_prompt(VOCAB, seed=seed)) for seed in (0, 1)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_a_cost_cache(tmp_path_factory):
    with single_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECDEC_COST_CACHE", str(tmp_path_factory.mktemp("costs")))
        yield


@functools.lru_cache(maxsize=None)
def target():
    return peaky(fresh_tiny_model("llama", vocab=VOCAB, layers=2, init_range=0.1))


@functools.lru_cache(maxsize=None)
def draft():
    return noisy_copy(target(), 0.1)


def sequences(count: int, length: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    """(examples, result) of a 300-step training on 60 sequences of the tiny pair; ~1 s."""
    examples = acceptance_examples(draft(), target(), sequences(60))
    config = AcceptanceHeadConfig.for_draft(draft(), layers=2)
    return examples, train_acceptance_head(examples, config, TrainConfig(steps=300, lr=3e-3, batch_size=256))


@pytest.fixture(scope="module")
def head_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    trained[1].head.save(path)
    return path


def constant_head(p: float, weight: float = 6.0) -> AcceptanceHead:
    """A head that says p for every hidden state of the tiny draft (no blocks, zero weights, the bias set)."""
    head = AcceptanceHead(AcceptanceHeadConfig.for_draft(draft(), layers=0, weight=weight)).double()
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.fill_(math.log(p / (1 - p)) - math.log(weight))
    return head


# ---------------------------------------------------------------------------------------------------- head files


def test_head_round_trip(tmp_path, trained):
    head = trained[1].head
    path = tmp_path / "head.safetensors"
    head.save(path)
    loaded = AcceptanceHead.load(path, draft=draft())
    assert loaded.config == head.config and len(loaded.blocks) == 2
    assert loaded.config.hidden_size == 64 and loaded.config.vocab_size == VOCAB and loaded.config.model_type == "llama"
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    hidden = trained[0].hidden[:7]
    with torch.no_grad():  # the same weights; the loaded ones may sit at another alignment (BLAS rounding)
        assert torch.allclose(loaded.probability(hidden), head.probability(hidden), rtol=0, atol=1e-12)


def _truncated(path, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(path.read_bytes()[:-100])
    return bad


def _random_bytes(path, tmp_path):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(torch.randint(256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                    .numpy().tobytes())
    return bad


def _not_a_head(path, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "weights.safetensors"
    save_file({"out.weight": torch.zeros(1, 64)}, str(bad), metadata={"format": "pt"})
    return bad


def _missing(path, tmp_path):
    return tmp_path / "nowhere.safetensors"


@pytest.mark.parametrize("make_bad, message", [(_missing, "no acceptance head file"),
                                               (_truncated, "not a readable acceptance head"),
                                               (_random_bytes, "not a readable acceptance head"),
                                               (_not_a_head, "no 'specdec_acceptance_head' entry")])
def test_bad_head_files_raise_clear_errors(head_file, tmp_path, make_bad, message):
    with pytest.raises(ValueError, match=message):
        AcceptanceHead.load(make_bad(head_file, tmp_path))


def test_tensors_that_do_not_fit_the_config_are_refused(head_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(head_file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["out.weight"] = torch.zeros(1, 32, dtype=torch.float64)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="do not match its acceptance head config"):
        AcceptanceHead.load(tmp_path / "bad.safetensors")


def test_a_head_for_another_draft_is_refused(head_file):
    wider = fresh_tiny_model("llama", vocab=VOCAB, layers=2)
    wider.config.hidden_size = 96  # the check reads the config (no need to build the weights)
    for other, message in ((fresh_tiny_model("gpt2", vocab=VOCAB), "model type llama, this draft has gpt2"),
                           (wider, "hidden size 64, this draft has 96"),
                           (fresh_tiny_model("llama", vocab=VOCAB, layers=1), "layer count 2, this draft has 1"),
                           (fresh_tiny_model("llama", vocab=256), "vocab 128, this draft has 256")):
        with pytest.raises(ValueError, match=message):
            AcceptanceHead.load(head_file, draft=other)
    with pytest.warns(RuntimeWarning, match="another checkpoint"):  # same shape, other weights
        AcceptanceHead.load(head_file, draft=target())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AcceptanceHead.load(head_file, draft=draft())


# ---------------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("label", ["greedy", "ratio"])
def test_labels_and_hidden_rows_equal_a_direct_computation(label):
    """Row (s, t, pick) = the draft's hidden state and token at position t of sequence s (each prefix run alone),
    labelled from the target's distribution there."""
    ids = sequences(3, length=10, seed=1)
    examples = acceptance_examples(draft(), target(), ids, label, sampled=True, batch_size=2)
    assert len(examples) == 3 * 10 * 2
    greedy_hits = 0
    with torch.no_grad():
        for row in range(len(examples)):
            s, t, pick = row // 20, row % 20 // 2, row % 2
            prefix = ids[s: s + 1, : t + 1]
            out = draft()(input_ids=prefix, output_hidden_states=True)
            q, p = out.logits[0, -1].softmax(-1), target()(input_ids=prefix).logits[0, -1].softmax(-1)
            token = int(examples.tokens[row])
            if pick == 0:
                assert token == int(q.argmax())
            expected = float(token == int(p.argmax())) if label == "greedy" else min(1.0, float(p[token] / q[token]))
            assert examples.labels[row].item() == pytest.approx(expected, abs=1e-6)
            assert torch.allclose(examples.hidden[row], out.hidden_states[-1][0, -1], atol=1e-10)
            assert int(examples.sequence[row]) == s
            greedy_hits += pick == 0 and expected == 1.0
    assert 0 < greedy_hits < 30  # some draft tokens accepted, some not: both label values were checked
    assert (examples.tokens[1::2] != examples.tokens[::2]).any()  # the sampled picks are draws, not the argmax


def test_vocab_mismatch_is_refused():
    with pytest.raises(ValueError, match="draft vocab 256 != target vocab 128"):
        acceptance_examples(fresh_tiny_model("llama", vocab=256), target(), sequences(2))


def test_target_continuations_are_its_greedy_text():
    prompts = sequences(2, length=12)
    written = continue_with_target(target(), prompts, 5)
    assert written.shape == prompts.shape and torch.equal(written[:, :7], prompts[:, :7])
    for row in range(2):
        assert written[row, 7:].tolist() == greedy_truth(target(), tuple(prompts[row, :7].tolist()), 5)
    with pytest.raises(ValueError, match="generate must be in"):
        continue_with_target(target(), prompts, 12)


# ------------------------------------------------------------------------------------------------------- metrics


def test_ece_on_hand_made_numbers():
    assert ece(torch.tensor([0.1, 0.3, 0.9]), torch.tensor([0.0, 1.0, 1.0])) == pytest.approx(0.3)  # docstring
    # bin [.2, .3): mean p .245, mean y .5; bin [.9, 1]: p = 1 joins it, mean p .95, mean y 1 -> (2*.255 + 2*.05) / 4
    probs = torch.tensor([0.2, 0.29, 0.9, 1.0], dtype=torch.float64)
    assert ece(probs, torch.tensor([0.0, 1.0, 1.0, 1.0])) == pytest.approx(0.1525)
    assert ece(torch.tensor([0.75, 0.75, 0.75, 0.75]), torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(0.0)
    assert ece(torch.tensor([0.05, 0.95], dtype=torch.float64), torch.tensor([0.0, 1.0]), bins=1) == pytest.approx(0.0,
                                                                                                        abs=1e-15)


def test_auc_on_hand_made_numbers():
    labels = torch.tensor([False, False, True, True])
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75)
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == pytest.approx(1.0)
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == pytest.approx(0.5)  # ties count half
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))


# ------------------------------------------------------------------------------------------------------ training


def test_training_lowers_held_out_bce_and_calibrates(trained):
    examples, result = trained
    before, after = result.before, result.after
    assert after["bce"] < before["bce"] - 0.1 and after["loss"] < before["loss"]
    assert after["ece"] < before["ece"]
    assert 0.2 < after["mean_label"] < 0.8
    assert after["mean_prob"] == pytest.approx(after["mean_label"], abs=0.08)  # the class weight is undone
    _, held_out = examples.split()
    with torch.no_grad():
        probs = result.head.probability(held_out.hidden)
    assert after["ece"] == pytest.approx(ece(probs, held_out.labels))
    assert after == evaluate(result.head, held_out)
    assert set(held_out.sequence.tolist()) == set(range(9, 60, 10))  # every 10th sequence is held out


@pytest.mark.parametrize("weight", [1.0, 6.0])
def test_probability_undoes_the_class_weight(weight):
    """At the minimiser of the weighted BCE the probabilities equal the label rate: fit a bias-only head to
    labels of rate .3 (every hidden state zero)."""
    from specdec.train.acceptance_head import AcceptanceExamples

    count = 400
    labels = (torch.arange(count) % 10 < 3).float()
    examples = AcceptanceExamples(torch.zeros(count, 64, dtype=torch.float64), torch.zeros(count, dtype=torch.long),
                                  labels, torch.arange(count) // 20)
    config = AcceptanceHeadConfig.for_draft(draft(), layers=0, weight=weight)
    result = train_acceptance_head(examples, config, TrainConfig(steps=400, lr=0.05, batch_size=count))
    assert result.after["mean_prob"] == pytest.approx(0.3, abs=0.01)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path, trained):
    examples = trained[0]
    config = AcceptanceHeadConfig.for_draft(draft(), layers=1)
    train = TrainConfig(steps=30, lr=3e-3, batch_size=64, save_every=7)
    whole = train_acceptance_head(examples, config, train, tmp_path / "a.ckpt.safetensors")
    part = train_acceptance_head(examples, config, train, tmp_path / "b.ckpt.safetensors", stop_after=12)
    assert part.state.step == 12
    resumed = train_acceptance_head(examples, config, train, tmp_path / "b.ckpt.safetensors", resume=True)
    assert resumed.state.step == 30 and resumed.state.losses == whole.state.losses
    for name, value in whole.head.state_dict().items():
        assert torch.equal(resumed.head.state_dict()[name], value), name
    with pytest.raises(ValueError, match="lr differ"):
        train_acceptance_head(examples, config, TrainConfig(steps=30, lr=1e-2, batch_size=64), tmp_path /
                              "b.ckpt.safetensors", resume=True)
    with pytest.raises(ValueError, match="data differ"):
        train_acceptance_head(acceptance_examples(draft(), target(), sequences(20, seed=5)), config, train,
                              tmp_path / "b.ckpt.safetensors", resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        train_acceptance_head(examples, config, train, tmp_path / "c.ckpt.safetensors", resume=True)


def test_stories_head_ranks_acceptance_better_than_the_drafts_confidence(stories_model):
    """stories260K (target) and its first 3 layers (draft) on the target's own greedy stories: the trained head's
    held-out AUC beats the draft's top probability's (~0.6), and its probabilities are calibrated."""
    truncated = copy.deepcopy(stories_model)
    truncated.model.layers = truncated.model.layers[:3]
    truncated.config.num_hidden_layers = 3
    starts = torch.randint(3, 512, (30, 128), generator=torch.Generator().manual_seed(0))
    starts[:, 0] = 1
    stories = continue_with_target(stories_model, starts, 120)
    examples = acceptance_examples(truncated, stories_model, stories)
    result = train_acceptance_head(examples, AcceptanceHeadConfig.for_draft(truncated, layers=2),
                                   TrainConfig(steps=300, lr=3e-3, batch_size=256))
    _, held_out = examples.split()
    with torch.no_grad():
        confidence = truncated(input_ids=stories[held_out.sequence.unique()]).logits.softmax(-1).amax(-1)
    assert result.after["auc"] > auc(confidence.flatten(), held_out.labels > 0.5) + 0.1
    assert result.after["auc"] > 0.7 and result.after["ece"] < 0.08


def test_cli_writes_a_loadable_head(tmp_path):
    target_dir, draft_dir, data = tmp_path / "target", tmp_path / "draft", tmp_path / "text.txt"
    tiny_target = peaky(fresh_tiny_model("llama", vocab=256, layers=2, init_range=0.1))
    tiny_target.save_pretrained(target_dir)
    tiny_tokenizer().save_pretrained(target_dir)
    noisy_copy(tiny_target, 0.1).save_pretrained(draft_dir)
    data.write_text("".join(ALPHABET[i % 7:] + ALPHABET[: i % 7] for i in range(40)))
    parser = argparse.ArgumentParser()
    add_acceptance_head_parser(parser.add_subparsers())
    out = tmp_path / "heads" / "head.safetensors"
    args = parser.parse_args(["acceptance-head", "--target", str(target_dir), "--draft", str(draft_dir), "--data",
                              str(data), "--out", str(out), "--steps", "20", "--max-length", "32", "--layers", "1",
                              "--label", "ratio", "--dtype", "float32", "--device", "cpu", "--generate", "8"])
    assert args.run(args) == 0
    head = AcceptanceHead.load(out, draft=noisy_copy(tiny_target, 0.1).float())
    assert head.config.label == "ratio" and head.config.layers == 1 and head.out.weight.abs().sum() > 0
    assert checkpoint_path(out).is_file()


# ---------------------------------------------------------------------------------------------------- controller


def test_controller_options_are_checked(head_file, tmp_path):
    for bad in (0, 0.0, 1, 1.5, -0.2, True, "high"):
        with pytest.raises(ValueError, match=r"h \(the stop threshold"):
            AcceptanceHeadController(head=head_file, h=bad)
    with pytest.raises(ValueError, match="needs head=PATH"):
        AcceptanceHeadController()
    with pytest.raises(ValueError, match="no acceptance head file"):
        AcceptanceHeadController(head=tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError, match="max_depth"):
        AcceptanceHeadController(head=head_file, max_depth=0)
    controller = make_controller(f"acceptance_head:head={head_file},h=0.4,max_depth=6")
    assert isinstance(controller, AcceptanceHeadController) and controller.h == 0.4 and controller.max_depth == 6
    with pytest.raises(ValueError, match="hidden size 64, the draft model's hidden states have 32"):
        controller.keep_drafting(Frontier(1, (0.5,), hidden=torch.zeros(1, 32)))


def test_fixed_h_stops_where_the_chance_of_any_rejection_passes_it():
    """p = .9 at every depth: 1 - .9^d = .1, .19, .271, .344 -> with h = .3 the 4th depth stops the draft; a new
    draft (depth 1) starts the product over."""
    controller = AcceptanceHeadController(head=constant_head(0.9), h=0.3)
    hidden = torch.zeros(1, 64, dtype=torch.float64)
    decisions = [controller.keep_drafting(Frontier(depth, (1.0,), hidden=hidden)) for depth in (1, 2, 3, 4, 1)]
    assert decisions == [True, True, True, False, True]
    assert controller.report()["head_stops"] == 1 and controller.report()["head_h"] == 0.3
    # a tree frontier: survival follows its most likely node (the second row's .9, not the first's .5)
    two = torch.stack([torch.full((64,), 1.0), torch.zeros(64)]).double()
    tree_head = constant_head(0.9)
    with torch.no_grad():
        tree_head.out.weight.fill_(-math.log(9) / 64)  # row 0 (all ones): calibrated logit 0 -> p = .5
    tree = AcceptanceHeadController(head=tree_head, h=0.3)
    assert [tree.keep_drafting(Frontier(d, (1.0, 1.0), hidden=two)) for d in (1, 2, 3, 4)] == [True] * 3 + [False]


def test_derived_h_is_the_cost_rule_with_the_heads_survival():
    """h None: at every depth the head's decision equals `CostAware.keep_drafting` given the head's survival .8^d
    as the frontier's score; the rule both keeps and stops somewhere on the way."""
    controller = AcceptanceHeadController(head=constant_head(0.8))
    controller.cost = CostModel({0: 0.010, 1: 0.011, 4: 0.014, 16: 0.030})
    for depth, accepted in ((3, 2), (4, 1), (2, 2)):
        controller.observe(StepStats(depth, depth, accepted, draft_s=0.002 * depth, verify_s=0.011 + 0.001 * depth,
                                     step_s=0.015 + 0.003 * depth))
    hidden = torch.zeros(1, 64, dtype=torch.float64)
    by_head = [controller.keep_drafting(Frontier(d, (1.0,), nodes=d, hidden=hidden)) for d in range(1, 13)]
    by_scores = [controller.keep_drafting(Frontier(d, (0.8 ** d,), nodes=d)) for d in range(1, 13)]
    assert by_head == by_scores and True in by_head and False in by_head
    report = controller.report()
    assert report["head_calls"] == 12 and 0.0 < report["head_h"] < 1.0


class RecordingController(AcceptanceHeadController):
    """The controller, keeping every frontier it was shown."""

    def __init__(self, **options):
        super().__init__(**options)
        self.frontiers: list[Frontier] = []

    def keep_drafting(self, frontier: Frontier) -> bool:
        self.frontiers.append(frontier)
        return super().keep_drafting(frontier)


def draft_step(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the draft's last hidden state, its next-token probabilities) after `ids`."""
    with torch.no_grad():
        out = draft()(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1], out.logits[0, -1].softmax(-1)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_the_drafter_hands_over_the_hidden_state_where_each_frontier_token_was_drafted(mode):
    """Each frontier row must be the draft's hidden state after the committed tokens and the node's ancestors.
    The test finds each frontier node among the tree's nodes of its depth by its slot probability (`Frontier.probs`,
    computed here from the draft's own distribution at the node's parent)."""
    controller = RecordingController(head=constant_head(0.99), h=0.9)  # .99^3 > .1: every depth is drafted
    drafter = ModelDrafter(draft(), mode=mode, topk=2)
    context = list(PROMPTS[0])
    tree = drafter.propose(DraftContext(context, Budget(max_nodes=64, max_depth=4), SamplingParams(),
                                        TargetView(VOCAB, torch.device("cpu")), None, controller.keep_drafting))
    paths = []  # each node's tokens from the root
    for token, parent in zip(tree.tokens.tolist(), tree.parents.tolist()):
        paths.append(([] if parent < 0 else paths[parent]) + [token])
    assert [frontier.depth for frontier in controller.frontiers] == [1, 2, 3]
    split = 0  # frontiers whose nodes have different parents
    for frontier in controller.frontiers:
        assert frontier.hidden.shape == ((1 if mode == "chain" else 2), 64)
        parents = set()
        for row, prob in zip(frontier.hidden, frontier.probs):
            found = []
            for path in (path for path in paths if len(path) == frontier.depth):
                hidden, probs = draft_step(context + path[:-1])
                if abs(float(probs[path[-1]]) - prob) < 1e-12:
                    found.append((tuple(path[:-1]), hidden))
            assert len(found) == 1
            parents.add(found[0][0])
            assert torch.allclose(row, found[0][1], atol=1e-10)
        split += len(parents) > 1
    assert split > 0 or mode == "chain"  # a tree frontier drew rows from two parents: the row mapping was tested
    plain = ModelDrafter(draft(), mode=mode, topk=2)  # a controller that does not ask: no hidden states
    budget_only = RecordingController(head=constant_head(0.99), h=0.9)
    budget_only.wants_hidden = False
    plain.propose(DraftContext(context, Budget(max_nodes=64, max_depth=4), SamplingParams(),
                               TargetView(VOCAB, torch.device("cpu")), None, budget_only.keep_drafting))
    assert budget_only.frontiers and all(frontier.hidden is None for frontier in budget_only.frontiers)


def generate(controller, drafter, length: int = 40):
    generator = SpeculativeGenerator(target(), drafter=drafter, controller=controller)
    reports, drafted = [], 0
    for prompt in PROMPTS:
        out = generator.generate(list(prompt), max_new_tokens=length)
        assert out.stats.drafter_errors == 0
        assert out.token_ids == greedy_truth(target(), prompt, length)
        reports.append(out.stats.controller)
        drafted += out.stats.drafted_nodes
    return reports, drafted


@pytest.mark.parametrize("h", [0.05, 0.9, None])
def test_greedy_output_equals_the_reference_while_the_head_cuts_drafts(head_file, h):
    controller = AcceptanceHeadController(head=head_file, h=h, profile_reps=2, max_depth=8, max_nodes=8)
    reports, _ = generate(controller, ModelDrafter(draft(), mode="chain"))
    calls = sum(report["head_calls"] for report in reports)
    stops = sum(report["head_stops"] for report in reports)
    assert calls > 0
    if h == 0.05:  # the head's p is below .95 almost everywhere: nearly every consultation stops the draft
        assert stops > 0 and stops >= calls // 2
    if h == 0.9:  # p > .1 mostly: drafts go on past their first consultation
        assert calls > stops
    for report in reports:
        assert report["head_h"] is None or type(report["head_h"]) is float and 0.0 <= report["head_h"] <= 1.0


def test_without_hidden_states_the_cost_rule_decides(head_file):
    """graphs=True: the draft runs on a static cache, which hands no hidden states over: CostAware's rule."""
    controller = AcceptanceHeadController(head=head_file, h=0.05, profile_reps=2, max_depth=8, max_nodes=8)
    reports, drafted = generate(controller, ModelDrafter(draft(), mode="chain", graphs=True), length=24)
    assert drafted > 0 and all(report["head_calls"] == 0 for report in reports)
