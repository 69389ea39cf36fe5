"""The `model` drafter in a batch (`specdec.drafters.model_batch`): every row's greedy chain drafted with one draft
forward per depth for all rows, each row's output still its batch-1 greedy answer; a proposer that raises costs
plain steps only."""

from __future__ import annotations

import random

import pytest

from specdec import SpeculativeGenerator
from specdec.batch import BatchAllocator, BatchGate
from specdec.drafters.model_batch import BatchedChains
from tiny_models import fresh_tiny_model, greedy_truth, repetitive_prompt, single_thread

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A target, and two saved drafts: the target itself (every chain accepted) and an unrelated model."""
    target = fresh_tiny_model("llama", init_range=0.1)
    same, other = tmp_path_factory.mktemp("same"), tmp_path_factory.mktemp("other")
    target.save_pretrained(same)
    fresh_tiny_model("llama", seed=5, init_range=0.1).save_pretrained(other)
    return target, same, other


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [repetitive_prompt(VOCAB, seed=seed * 100 + i, length=rng.randint(3, 30)) for i in range(count)]


def _always_speculate(monkeypatch):
    """No timing-driven plain steps or cuts: every step drafts every row's whole chain."""
    monkeypatch.setattr(BatchGate, "speculate", lambda self: True)
    monkeypatch.setattr(BatchAllocator, "cost", lambda self, widths: [1.0] * len(widths))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("draft", ["same", "other"])
def test_batched_chains_keep_every_row_its_batch_one_answer_with_one_draft_forward_a_depth(
        pair, batch_size, draft, monkeypatch):
    _always_speculate(monkeypatch)
    target, same, other = pair
    batch = _prompts(11, seed=batch_size)
    truth = [greedy_truth(target, tuple(p), 20) for p in batch]
    generator = SpeculativeGenerator(target, drafter=f"model:path={same if draft == 'same' else other},mode=chain",
                                     controller="static:max_depth=4,max_nodes=4")
    generator.drafter.bind(generator.target_view)
    calls = []
    generator.drafter.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    outputs = generator.generate(batch, max_new_tokens=20, batch_size=batch_size)
    assert [out.token_ids for out in outputs] == truth
    assert all(out.stats.drafter_errors == 0 for out in outputs)
    if batch_size > 1:  # (batch 1 is the one-sequence path)
        steps = generator.batch_stats.steps["speculative"]
        # per step: the catch-up and one forward per further depth, for all rows at once; prefills: one per prompt
        assert steps > 0 and len(calls) <= steps * 4 + len(batch)
    if draft == "same":
        assert all(out.stats.tau > 3 for out in outputs)
    # the same prompts in another order: the same answers
    order = list(range(len(batch)))
    random.Random(batch_size).shuffle(order)
    again = generator.generate([batch[i] for i in order], max_new_tokens=20, batch_size=batch_size)
    assert [out.token_ids for out in again] == [truth[i] for i in order]


def test_a_batched_proposer_that_raises_costs_plain_steps_and_loses_nothing(pair, monkeypatch):
    _always_speculate(monkeypatch)
    target, same, _ = pair
    batch = _prompts(5, seed=9)

    def broken(self, contexts):
        raise RuntimeError("draft device lost")

    monkeypatch.setattr(BatchedChains, "propose", broken)
    generator = SpeculativeGenerator(target, drafter=f"model:path={same},mode=chain",
                                     controller="static:max_depth=3,max_nodes=3")
    with pytest.warns(RuntimeWarning, match="draft device lost"):
        outputs = generator.generate(batch, max_new_tokens=10, batch_size=3)
    assert [out.token_ids for out in outputs] == [greedy_truth(target, tuple(p), 10) for p in batch]
    assert all(out.stats.drafter_errors > 0 for out in outputs)


def test_trees_and_learning_drafters_keep_drafting_per_row(pair):
    target, same, _ = pair
    view = SpeculativeGenerator(target, drafter="ngram").target_view
    tree = SpeculativeGenerator(target, drafter=f"model:path={same},mode=tree").drafter
    chain = SpeculativeGenerator(target, drafter=f"model:path={same},mode=chain").drafter
    assert tree.batch_proposer(2, 64, view) is None
    alone = SpeculativeGenerator(target, drafter=f"model:path={same},mode=chain,batched=False").drafter
    assert alone.batch_proposer(2, 64, view) is None
    assert isinstance(chain.batch_proposer(2, 64, view), BatchedChains)


def test_on_a_native_target_the_draft_runs_its_own_native_forward(pair):
    """The draft's batched cache gets a native forward of the draft's weights, never the target's."""
    from specdec.batch import batch_proposer
    from specdec.batch_native import NativeBatchedBackend, batched_backend

    pytest.importorskip("triton")
    target, other = fresh_tiny_model("llama", init_range=0.1).float(), pair[2]  # the native forward: float32
    generator = SpeculativeGenerator(target, drafter=f"model:path={other},mode=chain", backend="native")
    proposer = batch_proposer(generator, batched_backend(target, 2, native=generator.backend.native, max_len=64))
    assert isinstance(proposer.cache, NativeBatchedBackend)
    assert proposer.cache.native is not generator.backend.native and proposer.cache.model is generator.drafter.model
