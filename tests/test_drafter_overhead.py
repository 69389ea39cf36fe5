"""The `model` drafter's host cost per draft step. On CUDA every read of a device tensor (`.tolist()`, `.item()`,
`int(t)`, ...) waits for the GPU, and the draft model's own step is ~50 us: so the drafter reads the device once per
greedy draft step (a greedy chain once per draft: its tokens stay on the device) and twice per sampled one (the slot
probabilities, then every slot's tokens), whatever the width, and observe() reads nothing. Counted here on the CPU,
where the same code runs: reads made by the drafter's own module, per draft forward."""

from __future__ import annotations

import sys

import pytest
import torch

from specdec.controllers import Budget
from specdec.drafters import DraftContext, TargetView
from specdec.drafters import model as model_drafter
from specdec.drafters.model import ModelDrafter
from specdec.sampling import SamplingParams
from specdec.verify import VerifyResult
from tiny_models import fresh_tiny_model, repetitive_prompt, single_thread

READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")
VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def drafter_reads(monkeypatch):
    """A list that gets one entry per tensor read made from `specdec.drafters.model`."""
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == model_drafter.__name__:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=0),
                                    SamplingParams(temperature=1.0, top_p=0.6, seed=1)],
                         ids=["greedy", "sampled", "sampled-top-p"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_device_reads_per_draft_step(mode, params, drafter_reads):
    drafter = ModelDrafter(fresh_tiny_model("llama", vocab=VOCAB, init_range=0.1), mode=mode, topk=4, graphs=True)
    prompt = repetitive_prompt(VOCAB)
    view = TargetView(VOCAB, torch.device("cpu"))
    budget = Budget(max_nodes=16, max_depth=5)
    drafter.propose(DraftContext(prompt, budget, params, view))  # builds the draft cache
    forwards = []
    run, chain = drafter.kv.run, drafter.kv.greedy_chain

    def counted_chain(token, position, count):
        forwards.extend([1] * count)
        return chain(token, position, count)

    drafter.kv.run = lambda *args, **kwargs: forwards.append(1) or run(*args, **kwargs)
    drafter.kv.greedy_chain = counted_chain
    for step in range(4):
        drafter_reads.clear()
        forwards.clear()
        tree = drafter.propose(DraftContext(prompt, budget, params, view))
        # a greedy chain runs as one graph (`GraphKV.greedy_chain`) and is read once
        expected = 1 if mode == "chain" and params.greedy else len(forwards) * (1 if params.greedy else 2)
        assert len(drafter_reads) == expected, (drafter_reads, len(forwards))
        assert len(forwards) >= (4 if mode == "chain" else 2)
        assert tree.host_tokens == tuple(tree.tokens.tolist())  # the generator and verifier need not read them
        drafter_reads.clear()
        path = [0] if len(tree) else []
        drafter.observe(VerifyResult(tree, path, [tree.host_tokens[node] for node in path], 0, None))
        assert drafter_reads == []
        prompt = prompt + [tree.host_tokens[node] for node in path] + [step % VOCAB]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_draws_what_torch_multinomial_draws(dtype):
    """`_sample` (no validity checks, so no device reads) gives torch.multinomial(probs, 1)'s tokens and leaves the
    generator where it does: the drafts of a seeded generation do not change."""
    torch.manual_seed(0)
    for trial in range(200):
        rows, vocab = trial % 5 + 1, 2 + 7 * trial % 300
        probs = torch.rand(rows, vocab, dtype=dtype) ** 4
        probs[probs < 0.3 * (trial % 2)] = 0  # zero-probability tokens, as top-k / top-p leave
        probs[:, trial % vocab] += 1e-3
        probs /= probs.sum(-1, keepdim=True)
        ours, theirs = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        assert torch.equal(model_drafter._sample(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])
        assert torch.equal(ours.get_state(), theirs.get_state())
