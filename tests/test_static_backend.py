"""The static-cache backend: the same contract as the HF backend on a preallocated buffer written in place."""

import random

import pytest
import torch

from specdec import SamplingParams, SpeculativeGenerator
from specdec.backends.hf import HFBackend
from specdec.backends.static import StaticBackend
from specdec.reference import reference_decode
from specdec.stopping import StopRule
from specdec.verify import verify
from test_backend import ATOL, _random_tree_around
from tiny_models import ARCHITECTURES, VOCAB, repetitive_prompt, tiny_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_equals_the_hf_backend_reference(arch):
    model = tiny_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=1)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(40))
    assert reference_decode(StaticBackend(model, max_len=128), prompt, SamplingParams(), StopRule(40)) == truth
    out = SpeculativeGenerator(model, drafter="ngram", backend=StaticBackend(model, max_len=128)).generate(
        prompt, max_new_tokens=40)
    assert out.token_ids == truth
    assert out.stats.tau > 1.0


def _assert_buffer_holds(static: StaticBackend, state, committed: list[int]) -> None:
    """The first `length` slots of every layer == a fresh HF-backend prefill of committed[:-1]."""
    assert state.length == len(committed) - 1
    fresh = HFBackend(static.model).prefill(committed[:-1])
    for index, layer in enumerate(fresh.cache.layers):
        torch.testing.assert_close(state.buffer[index, 0, ..., : state.length, :], layer.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(state.buffer[index, 1, ..., : state.length, :], layer.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_buffer_holds_the_committed_tokens_after_every_step(arch):
    static = StaticBackend(tiny_model(arch), max_len=160)
    rng = random.Random(3)
    prompt = repetitive_prompt(VOCAB, seed=2, length=9)
    truth = reference_decode(static, prompt, SamplingParams(), StopRule(90))
    state = static.prefill(prompt[:-1])
    committed, moved = list(prompt), 0
    for step in range(16):
        done = len(committed) - len(prompt)
        tree, expected = _random_tree_around(truth[done:], rng, true_len=step % 6)
        result = verify(static, state, committed[-1], tree, SamplingParams(), None)
        assert result.accepted_len == expected
        committed += result.committed_tokens
        moved += result.accepted_nodes != list(range(result.accepted_len))
        _assert_buffer_holds(static, state, committed)
    assert moved >= 2  # some accepted paths were later branches: their rows had to move


def test_generation_stops_at_the_static_cache_size():
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=3, length=20)
    out = SpeculativeGenerator(model, drafter="ngram", backend=StaticBackend(model, max_len=48)).generate(
        prompt, max_new_tokens=100)
    assert out.stats.stop_reason == "context" and len(prompt) + len(out.token_ids) == 48
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(100))
    assert out.token_ids == truth[: len(out.token_ids)]
    with pytest.raises(ValueError, match="context window is 48"):
        SpeculativeGenerator(model, backend=StaticBackend(model, max_len=48)).generate(list(range(48)))
