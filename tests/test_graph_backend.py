"""The graph backend: bucketed static-shape steps (CUDA graphs on a GPU, the same code eagerly here) keep the
backend contract: greedy output equals the reference decoder, the cache holds exactly the committed tokens, steps
that fit no bucket run eagerly and stay correct."""

import random
import shutil

import pytest
import torch

from specdec import SamplingParams, SpeculativeGenerator
from specdec.backends.graph import GraphBackend, chunk_sizes
from specdec.backends.hf import HFBackend
from specdec.reference import reference_decode
from specdec.stopping import StopRule
from specdec.verify import verify
from test_backend import _random_tree_around
from test_static_backend import _assert_buffer_holds
from tiny_models import VOCAB, fresh_tiny_model, repetitive_prompt, tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_greedy_equals_the_hf_backend_reference(arch):
    model = tiny_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=1)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(40))
    backend = GraphBackend(model, max_len=128)
    assert reference_decode(backend, prompt, SamplingParams(), StopRule(40)) == truth
    out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=40)
    assert out.token_ids == truth
    assert out.stats.tau > 1.0
    assert backend.eager_steps == 0


def test_buffer_holds_the_committed_tokens_after_every_padded_step():
    backend = GraphBackend(tiny_model("llama"), max_len=160, buckets=(1, 4, 16))
    rng = random.Random(5)
    prompt = repetitive_prompt(VOCAB, seed=2, length=9)
    truth = reference_decode(backend, prompt, SamplingParams(), StopRule(90))
    state = backend.prefill(prompt[:-1])
    committed, sizes = list(prompt), set()
    for step in range(16):
        done = len(committed) - len(prompt)
        tree, expected = _random_tree_around(truth[done:], rng, true_len=step % 6)
        sizes.add(backend.bucket(len(tree) + 1, state.length))
        result = verify(backend, state, committed[-1], tree, SamplingParams(), None)
        assert result.accepted_len == expected
        committed += result.committed_tokens
        _assert_buffer_holds(backend, state, committed)
    assert {4, 16} <= sizes  # trees were padded up to their buckets


def test_a_step_past_the_largest_bucket_runs_eagerly_and_stays_correct():
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=4)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(40))
    backend = GraphBackend(model, max_len=128, buckets=(1, 2))
    with pytest.warns(RuntimeWarning, match="exceeds the largest bucket 2"):
        out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=40)
    assert out.token_ids == truth
    assert backend.eager_steps > 0


def test_generation_stops_at_the_cache_size_with_padding_past_its_end():
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=3, length=20)
    backend = GraphBackend(model, max_len=48, buckets=(1, 8, 32))
    out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=100)
    assert out.stats.stop_reason == "context" and len(prompt) + len(out.token_ids) == 48
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(100))
    assert out.token_ids == truth[: len(out.token_ids)]


def test_bad_buckets_and_foreign_states_are_refused():
    model = tiny_model("llama")
    backend = GraphBackend(model, max_len=64)
    first = backend.prefill([1, 2, 3])
    assert backend.prefill([4, 5]) is first and first.length == 2  # one cache: a new prefill starts a new sequence
    with pytest.raises(ValueError, match="not the graph backend's current sequence"):
        backend.decode(GraphBackend(model, max_len=64).prefill([1, 2]), 6)
    with pytest.raises(ValueError, match="buckets must be sizes >= 1"):
        GraphBackend(model, max_len=64, buckets=(0, 4))


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_steps_give_the_same_output():
    """compile=True: every bucket's forward goes through torch.compile (inductor) before capture."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=1)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(24))
    backend = GraphBackend(model, max_len=96, buckets=(1, 16), compile=True)
    out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=24)
    assert out.token_ids == truth and out.stats.tau > 1.0 and backend.eager_steps == 0


def test_a_model_that_refuses_the_tree_attention_keeps_its_own(monkeypatch):
    """attention="specdec_tree" on a model whose attention cannot be switched: one warning, its own attention,
    the right output."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=1)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(24))

    def refuse(self, name):
        raise ValueError(f"{name} is not supported (test)")

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    backend = GraphBackend(model, max_len=96, attention="specdec_tree")
    with pytest.warns(RuntimeWarning, match="cannot use attention 'specdec_tree'"):
        out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=24)
    assert out.token_ids == truth and backend.attention is None
    assert model.config._attn_implementation == "sdpa"


def test_prefill_chunks_take_the_largest_fitting_square_then_one_bucket():
    assert chunk_sizes(300, 128, (256, 512)) == [256, 44]
    assert chunk_sizes(700, 128, (256, 512)) == [512, 128, 60]
    assert chunk_sizes(128, 128, (256, 512)) == [128] and chunk_sizes(0, 128, (256,)) == []
    assert chunk_sizes(300, 128, ()) == [128, 128, 44]


def test_prefill_through_the_prefill_squares_holds_the_prompt_and_decodes_as_hf():
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=6, length=46)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(12))
    backend = GraphBackend(model, max_len=128, buckets=(1, 2, 4), prefill_sizes=(8, 16, 3))
    assert backend.prefill_sizes == (8, 16)  # sizes not above the largest bucket are ignored
    state = backend.prefill(prompt[:-1])  # 45 = 16 + 16 + 8 + 4 + 1: every square and bucket kind
    _assert_buffer_holds(backend, state, prompt)
    assert reference_decode(backend, prompt, SamplingParams(), StopRule(12)) == truth
    assert backend.eager_steps == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_chain_is_the_greedy_continuation_and_leaves_its_rows_cached(arch):
    """`greedy_chain`: each one-query step's top token feeds the next on the device (one graph on CUDA): the ids are
    the greedy continuation, the probabilities each step's softmax maximum, and the cache then holds the rows a
    decode of the same tokens leaves (the next step decodes as HF does)."""
    model = tiny_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=4)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(9))
    backend = GraphBackend(model, max_len=128)
    state = backend.prefill(prompt[:-1])
    picks = backend.greedy_chain(state, torch.tensor([prompt[-1]]), len(prompt) - 1, 8)
    assert picks[:, 1].long().tolist() == truth[:8] and state.length == len(prompt) + 7
    reference = HFBackend(model)
    hf_state = reference.prefill(prompt[:-1])
    probs = [reference.decode(hf_state, token).double().softmax(-1).max().item() for token in [prompt[-1]] + truth[:7]]
    assert picks[:, 0].tolist() == pytest.approx(probs, abs=1e-6)
    assert backend.decode(state, truth[7]).argmax().item() == truth[8]
    with pytest.raises(ValueError, match="cache slots"):
        backend.greedy_chain(state, torch.tensor([truth[8]]), state.length, 128)


@pytest.mark.parametrize("backend_kind", ["graph", "native"])
def test_greedy_stream_pipelines_chains_and_a_caller_that_stops_early_keeps_a_consistent_state(backend_kind):
    """`greedy_stream` yields chains of `count` (the last one shorter at `limit`) with the tokens of HF's greedy
    decoding; state.length counts the chains yielded, so after a caller stops (one chain launched and unread) the
    sequence goes on from its last yielded token as if nothing more had run."""
    from specdec.backends.native import NativeBackend

    model = fresh_tiny_model("llama").float()
    prompt = repetitive_prompt(VOCAB, seed=8, length=10)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(40))
    size = 40  # cache slots (small: the native forward runs in Triton's interpreter here)
    backend = (GraphBackend if backend_kind == "graph" else NativeBackend)(model, max_len=size)
    state = backend.prefill(prompt[:-1])
    assert list(backend.greedy_stream(state, prompt[-1], 8, 19)) == [truth[:8], truth[8:16], truth[16:19]]
    assert state.length == len(prompt) - 1 + 19
    state = backend.prefill(prompt[:-1])
    stream = backend.greedy_stream(state, prompt[-1], 4, 40)
    assert [next(stream), next(stream)] == [truth[:4], truth[4:8]]
    stream.close()  # the third chain ran on the device; the state ends after the second
    assert state.length == len(prompt) - 1 + 8
    assert backend.greedy_decode(state, truth[7], 5) == truth[8:13]
    if backend_kind == "graph":  # the cache ends before the limit: the stream ends with it (greedy_stream's own
        state = backend.prefill(prompt[:-1])  # logic, the same for both: on the faster backend only)
        assert sum(len(chunk) for chunk in backend.greedy_stream(state, prompt[-1], 8, 100)) == size - len(prompt) + 1


@pytest.mark.parametrize("backend_kind", ["graph", "native"])
def test_greedy_ar_decodes_chains_on_the_device_and_stops_as_one_token_at_a_time(backend_kind, monkeypatch):
    """`reference_decode` on a backend with `greedy_decode`: chains of up to AR_CHAIN tokens per host round trip,
    the same tokens as one decode at a time and as HF, cut at an EOS inside a chain, at max_new_tokens that is no
    multiple of the chain, and at the end of the cache (the last slots one decode at a time)."""
    from specdec.backends.native import NativeBackend

    model = fresh_tiny_model("llama").float()  # the native forward runs float32 / half types
    prompt = repetitive_prompt(VOCAB, seed=6, length=12)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(30))
    size = 40  # cache slots (small: the native forward runs in Triton's interpreter here)
    make = (lambda: GraphBackend(model, max_len=size)) if backend_kind == "graph" else (
        lambda: NativeBackend(model, max_len=size))
    backend = make()
    chains = []
    original = type(backend)._launch_chain
    monkeypatch.setattr(type(backend), "_launch_chain",
                        lambda self, *args: chains.append(args[3]) or original(self, *args))
    assert reference_decode(backend, prompt, SamplingParams(), StopRule(21)) == truth[:21]
    assert chains == [8, 8, 5]
    if backend_kind == "graph":  # reference_decode's own logic, the same for both: on the faster backend only
        assert reference_decode(backend, prompt, SamplingParams(), StopRule(21), chain=1) == truth[:21]
        assert chains == [8, 8, 5]  # chain=1: one decode at a time
        _stops_at_an_eos_inside_a_chain(backend, prompt, truth, chains)
    room = size - len(prompt)  # the cache: the generation ends with the context, the last slots one at a time
    long = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(room))
    stop = StopRule(100, room=room)
    assert reference_decode(make(), prompt, SamplingParams(), stop) == long and stop.reason == "context"


def _stops_at_an_eos_inside_a_chain(backend, prompt, truth, chains):
    eos = truth[11]
    first = truth.index(eos)  # the first time the EOS id comes (a chain goes on past it; the output stops)
    chains.clear()
    stop = StopRule(30, eos_token_ids=frozenset({eos}))
    assert reference_decode(backend, prompt, SamplingParams(), stop) == truth[: first + 1] and stop.reason == "eos"
    assert len(chains) == min(first // 8 + 2, 4)  # pipelined: the chain after the EOS's was already launched
