"""The `model` drafter: a small LM with its own KV cache drafting chains and dynamic trees.

Targets are float64 tiny Llamas (argmax near-ties cannot flip) made peaky (lm_head x4: median top-1 probability
~0.55, like a trained LM). Drafters: the target itself, an unrelated smaller random model, the target with noise on
its weights, and stories260K without its last 2 layers. Greedy output must equal the reference decoder; the draft
cache must equal a fresh prefill of the committed tokens after every step; sampled drafts carrying q must leave the
target's distribution intact (chi-square), and a wrong q must not.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from specdec import SpeculativeGenerator
from specdec.backends.hf import cache_keyword
from specdec.backends.hf import HFBackend
from specdec.controllers import Budget
from specdec.drafters import DraftContext, TargetView
from specdec.drafters.model import ModelDrafter
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams, target_probs
from specdec.stopping import StopRule
from specdec.tree import DraftTree
from specdec.verify import VerifyResult
from tiny_models import chi_square_p_value, distorted, fresh_tiny_model, repetitive_prompt, single_thread

GREEDY = SamplingParams()
VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def peaky(model, gain: float = 4.0):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(gain)
    return model


def noisy_copy(model, scale: float, seed: int = 0):
    """`model` with Gaussian noise of `scale` x each weight tensor's std added: a drafter that mostly agrees."""
    noisy, generator = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in noisy.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * scale * weight.std())
    return noisy


@functools.lru_cache(maxsize=None)
def target():
    return peaky(fresh_tiny_model("llama", vocab=VOCAB, layers=2, init_range=0.1))


@functools.lru_cache(maxsize=None)
def draft_model(kind: str):
    if kind == "self":
        return target()
    if kind == "small":  # unrelated weights, 1 layer: almost every draft is rejected
        return peaky(fresh_tiny_model("llama", vocab=VOCAB, seed=5, layers=1, init_range=0.1))
    return noisy_copy(target(), 0.1)


@functools.lru_cache(maxsize=None)
def truth(prompt: tuple[int, ...], length: int) -> list[int]:
    return reference_decode(HFBackend(target()), list(prompt), GREEDY, StopRule(length))


PROMPTS = [tuple(repetitive_prompt(VOCAB, seed=seed)) for seed in (0, 1)]


def run(drafter, controller: str, length: int = 40, prompts=PROMPTS, **options):
    """Generate every prompt; greedy outputs must equal the reference. Returns (tau over all, accepted histogram)."""
    generator = SpeculativeGenerator(target(), drafter=drafter, controller=controller)
    new = forwards = 0
    accepted = Counter()
    for prompt in prompts:
        out = generator.generate(list(prompt), max_new_tokens=length, **options)
        assert out.stats.drafter_errors == 0  # a failed check in a drafter's observe() lands here
        if not options.get("temperature"):
            assert out.token_ids == truth(prompt, length)
        new, forwards = new + out.stats.new_tokens, forwards + out.stats.target_forwards
        accepted.update(out.stats.accepted_hist)
    return new / forwards, accepted


# ------------------------------------------------------------------------------------------- greedy == reference

@pytest.mark.parametrize("controller", ["static:max_depth=6,max_nodes=12", "heuristic:start_depth=4,max_depth=8"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("kind", ["self", "small", "noisy"])
def test_greedy_equals_reference(kind, mode, controller):
    tau, accepted = run(ModelDrafter(draft_model(kind), mode=mode), controller)
    if kind == "self":  # the target's greedy path is always the best path; a 0 only when 1 token is left to make
        assert accepted[0] <= len(PROMPTS) and tau > (4.5 if mode == "chain" else 2.5), (tau, accepted)
    elif kind == "noisy":
        assert 1.3 < tau and len(accepted) >= 3, (tau, accepted)


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("kind", ["self", "noisy"])
def test_greedy_equals_reference_with_the_draft_on_graphs(kind, mode):
    """graphs=True: the draft KV in a GraphBackend's static cache, frontiers as bucketed block steps (CUDA graphs
    on a GPU, the same code eagerly here): the same output and the same tau as the DynamicCache path."""
    controller = "heuristic:start_depth=4,max_depth=8"
    tau, _ = run(ModelDrafter(draft_model(kind), mode=mode, graphs=True), controller)
    eager_tau, _ = run(ModelDrafter(draft_model(kind), mode=mode), controller)
    assert tau == pytest.approx(eager_tau)
    assert tau > 1.2  # drafts were accepted: the graph steps were exercised


def test_stories_drafter_without_last_two_layers(stories_model):
    draft = copy.deepcopy(stories_model)
    draft.model.layers = draft.model.layers[:-2]
    draft.config.num_hidden_layers -= 2
    backend = HFBackend(stories_model)
    rule = StopRule(60, eos_token_ids=frozenset([2]))
    story = reference_decode(backend, [1], GREEDY, rule)
    prompts = [[1], [1] + story[:20]]
    for mode in ("chain", "tree"):
        generator = SpeculativeGenerator(stories_model, drafter=ModelDrafter(draft, mode=mode), controller="heuristic")
        new = forwards = 0
        for prompt in prompts:
            out = generator.generate(prompt, max_new_tokens=60)
            assert out.token_ids == reference_decode(backend, prompt, GREEDY, rule)
            new, forwards = new + out.stats.new_tokens, forwards + out.stats.target_forwards
        print(f"stories260K, drafter without its last 2 layers, {mode}: tau {new / forwards:.2f}")
        assert new / forwards > 1.15, (mode, new / forwards)


# -------------------------------------------------------------------------------------------------- KV rollback

class CheckedDrafter(ModelDrafter):
    """After every observe(): the draft cache == a fresh prefill of the tokens it says it holds, and those are the
    committed context + the accepted path (all of it but possibly the deepest node, which never ran)."""

    steps = 0
    context: list[int] | None = None  # the context of this step's propose(), None when the step had none

    def propose(self, ctx):
        self.context = list(ctx.token_ids)
        return super().propose(ctx)

    def observe(self, result):
        super().observe(result)
        context, self.context = self.context, None
        if not self.cached:  # propose() failed: the cache was dropped, the next propose() prefills again
            assert self.kv.length == 0
            return
        if context is not None and len(result.tree):
            kept = len(self.cached) - len(context)
            assert self.cached == context + result.accepted_tokens[:kept] and kept >= result.accepted_len - 1
        fresh = DynamicCache()
        with torch.no_grad():
            self.model(input_ids=torch.tensor([self.cached]), use_cache=True,
                       **{cache_keyword(self.model.forward): fresh})
        assert self.kv.length == len(self.cached) == fresh.get_seq_length()
        for index, theirs in enumerate(fresh.layers):
            keys, values = self.kv.layer(index)
            torch.testing.assert_close(keys, theirs.keys, rtol=0, atol=1e-5 if self.graphs else 1e-10)
            torch.testing.assert_close(values, theirs.values, rtol=0, atol=1e-5 if self.graphs else 1e-10)
        CheckedDrafter.steps += 1


class Feeds:
    """Forward pre-hook: the input length of every forward the drafter makes (the only caller passing position
    ids: CheckedDrafter's fresh prefills do not count); raises on the calls numbered in `fail_at`."""

    def __init__(self, model, fail_at=()):
        self.lengths, self.fail_at = [], set(fail_at)
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if kwargs.get("position_ids") is None:
            return
        self.lengths.append(kwargs["input_ids"].shape[1])
        if len(self.lengths) in self.fail_at:
            raise RuntimeError("draft model failure (test)")


class RecordingDrafter(ModelDrafter):
    """Records every proposed tree as (tokens, parents)."""

    def propose(self, ctx):
        tree = super().propose(ctx)
        self.trees.append((tree.host_tokens, tree.host_parents))
        return tree


@pytest.mark.parametrize("controller", ["static:max_depth=6", "static:max_depth=9,max_nodes=4",
                                        "heuristic:start_depth=4,max_depth=8"])
def test_device_chain_drafts_what_the_per_depth_loop_drafts(controller):
    """A greedy chain on GraphKV feeds each depth's top token on the device (`_greedy_chain`): the same trees,
    step for step, as `_grow`'s loop that reads every depth back to the host, and the reference output."""
    trees = {}
    for device_chain in (True, False):
        drafter = RecordingDrafter(draft_model("noisy"), mode="chain", graphs=True)
        drafter.device_chain, drafter.trees = device_chain, []
        run(drafter, controller)
        trees[device_chain] = drafter.trees
    assert trees[True] == trees[False] and len(trees[True]) > 10
    if controller.startswith("static"):  # the chain is min(max_depth, max_nodes) long (the window allowing)
        assert max(len(tokens) for tokens, _ in trees[True]) == (4 if "max_nodes=4" in controller else 6)


@pytest.mark.parametrize("graphs", [False, True], ids=["dynamic-cache", "graphs"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_kv_rollback_is_exact(mode, temperature, graphs):
    CheckedDrafter.steps = 0
    model = draft_model("noisy")
    feeds = Feeds(model)
    try:
        run(CheckedDrafter(model, mode=mode, graphs=graphs), "heuristic:start_depth=4,max_depth=8",
            temperature=temperature)
    finally:
        feeds.handle.remove()
    assert CheckedDrafter.steps > 20
    prefills = [n for n in feeds.lengths if n >= len(PROMPTS[0])]
    assert len(prefills) == len(PROMPTS)  # one prefill per sequence; otherwise only the new tokens are fed


def test_failing_draft_model_falls_back_and_recovers():
    CheckedDrafter.steps = 0
    model = draft_model("noisy")
    feeds = Feeds(model, fail_at={3, 9})  # two forwards part-way through the generation
    try:
        with pytest.warns(RuntimeWarning, match="draft model failure"):
            generator = SpeculativeGenerator(target(), drafter=CheckedDrafter(model), controller="heuristic")
            out = generator.generate(list(PROMPTS[0]), max_new_tokens=40)
    finally:
        feeds.handle.remove()
    assert out.token_ids == truth(PROMPTS[0], 40)
    assert out.stats.drafter_errors == 2 and out.stats.tau > 1.3 and CheckedDrafter.steps > 5


# --------------------------------------------------------------------------------------- dynamic tree vs chain

def test_dynamic_tree_beats_chain_at_equal_node_budget():
    budget = "static:max_depth=16,max_nodes=16"
    prompts = [tuple(repetitive_prompt(VOCAB, seed=seed)) for seed in range(4)]
    chain, _ = run(ModelDrafter(draft_model("noisy"), mode="chain"), budget, 48, prompts)
    tree, _ = run(ModelDrafter(draft_model("noisy"), mode="tree"), budget, 48, prompts)
    print(f"16 nodes, noisy drafter: chain tau {chain:.2f}, dynamic tree tau {tree:.2f}")
    assert tree >= chain + 0.3, (chain, tree)


# ------------------------------------------------------------------------------------------- tree construction

class BigramLM(torch.nn.Module):
    """A fake HF causal LM: next-token probabilities depend on the current token only (`probs[token]`). Its "KV"
    rows record (token, position), so the cache shows which tokens it holds and where."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.head = torch.nn.Linear(1, probs.shape[0], bias=False, dtype=torch.float64)
        self.register_buffer("log_probs", probs.clamp_min(1e-12).log())
        self.inputs: list[list[int]] = []

    device = property(lambda self: self.log_probs.device)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, position_ids, attention_mask, past_key_values, use_cache):
        self.inputs.append(input_ids[0].tolist())
        rows = torch.stack([input_ids, position_ids], -1).double()[:, None]  # (1, 1, T, 2)
        past_key_values.update(rows, rows, 0)
        return SimpleNamespace(logits=self.log_probs[input_ids])


ROOT, A, B, C, D, E = range(6)


def bigram() -> BigramLM:
    probs = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    for token, best, rest in [(ROOT, {A: 0.6, B: 0.3}, 0.025), (A, {C: 0.45, D: 0.4}, 0.0375),
                              (B, {E: 0.5, A: 0.2}, 0.075), (C, {A: 0.5, B: 0.2}, 0.075), (D, {B: 0.7}, 0.06)]:
        probs[token] = rest
        probs[token, list(best)] = torch.tensor(list(best.values()), dtype=torch.float64)
    return BigramLM(probs)


def propose(drafter, budget: Budget, params=GREEDY, context=(E, ROOT)) -> DraftTree:
    view = TargetView(vocab_size=6, device=torch.device("cpu"))
    return drafter.propose(DraftContext(list(context), budget, params, view))


def test_dynamic_tree_is_global_best_first_one_forward_per_depth():
    model = bigram()
    tree = propose(ModelDrafter(model, topk=2), Budget(max_nodes=3, max_depth=4))
    assert (tree.tokens.tolist(), tree.parents.tolist()) == ([A, B, C], [-1, -1, 0])  # the docstring's example
    assert model.inputs == [[E, ROOT], [A, B]]  # prefill + one frontier forward; then nothing could still enter
    model.inputs.clear()
    tree = propose(ModelDrafter(model, topk=2), Budget(max_nodes=6, max_depth=4))
    # depth 2: C .27, D .24, E .15 (B's), A .06 (B's); the frontier [C, D] gives D->B .168 > E .15 > C->A .135
    assert (tree.tokens.tolist(), tree.parents.tolist()) == ([A, B, C, D, E, B], [-1, -1, 0, 0, 1, 3])
    assert model.inputs == [[E, ROOT], [A, B], [C, D], [B]]  # B's children (<= .168 * .5) then lost to C->A .135
    model.inputs.clear()
    tree = propose(ModelDrafter(model, topk=2), Budget(max_nodes=6, max_depth=4, min_confidence=0.5))
    assert model.inputs == [[E, ROOT], [A]]  # only A is confident enough to expand; B stays as a leaf
    assert tree.tokens.tolist() == [A, B, C, D]
    tree = propose(ModelDrafter(model, mode="chain"), Budget(max_nodes=3, max_depth=8))
    assert (tree.tokens.tolist(), tree.parents.tolist()) == ([A, C, A], [-1, 0, 1])


def test_observe_keeps_the_accepted_path_kv_only():
    model = bigram()
    drafter = ModelDrafter(model, topk=2)
    tree = propose(drafter, Budget(max_nodes=3, max_depth=4))  # [A, B, C]: A and B ran (cache rows 2, 3)
    logits = torch.zeros(len(tree) + 1, 6)
    drafter.observe(VerifyResult(tree, accepted_nodes=[1], accepted_tokens=[B], bonus_token=D, logits=logits))
    assert drafter.cached == [E, ROOT, B]
    assert drafter.kv.layer(0)[0][0, 0].tolist() == [[E, 0], [ROOT, 1], [B, 2]]  # B's row moved up
    model.inputs.clear()
    propose(drafter, Budget(max_nodes=1, max_depth=1), context=(E, ROOT, B, D))
    assert model.inputs == [[D]]  # only the bonus is new
    tree = propose(drafter, Budget(max_nodes=3, max_depth=4), context=(E, A, ROOT))  # another sequence
    assert model.inputs[-2] == [A, ROOT] and drafter.cached == [E, A, ROOT]  # kept the common prefix [E]


def test_sampled_siblings_carry_q_without_replacement():
    model = bigram()
    params = SamplingParams(temperature=1.0, seed=3)
    tree = propose(ModelDrafter(model, topk=3), Budget(max_nodes=3, max_depth=1), params)
    p_root = target_probs(model.log_probs[ROOT], params)
    first, second, third = tree.tokens.tolist()
    assert len({first, second, third}) == 3 and tree.parents.tolist() == [-1, -1, -1]
    expected_second = p_root.clone()
    expected_second[first] = 0
    expected_third = expected_second.clone()
    expected_third[second] = 0
    expected = torch.stack([p_root, expected_second / expected_second.sum(), expected_third / expected_third.sum()])
    torch.testing.assert_close(tree.draft_probs, expected)
    top_k = SamplingParams(temperature=1.0, top_k=2, seed=3)
    tree = propose(ModelDrafter(model, topk=3), Budget(max_nodes=3, max_depth=1), top_k)
    assert sorted(tree.tokens.tolist()) == [A, B]  # q has 2 tokens: only 2 slots


# --------------------------------------------------------------------------------------- sampling losslessness

SMALL_VOCAB = 8
SAMPLE_PROMPT = [0, 1, 1, 5, 0, 1, 5, 1, 0, 1]
ALPHA = 1e-4


@functools.lru_cache(maxsize=None)
def small_target():
    return fresh_tiny_model("llama", vocab=SMALL_VOCAB, init_range=0.2, layers=1)


def exact_first_two(params: SamplingParams) -> torch.Tensor:
    """(V, V) float64: the target's probability of each first two tokens, by enumeration."""
    ids = torch.cat([torch.tensor(SAMPLE_PROMPT).expand(SMALL_VOCAB, -1), torch.arange(SMALL_VOCAB)[:, None]], 1)
    with torch.no_grad():
        probs = target_probs(small_target()(ids).logits[:, -2:], params).double()
    return probs[0, 0][:, None] * probs[:, 1]


class TargetQDrafter(ModelDrafter):
    """A deliberate bug: draws from the perturbed draft model but reports the target's own distributions as q."""

    def propose(self, ctx):
        tree = super().propose(ctx)
        parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
        rows = []
        for node in range(len(tree)):
            path, parent = [], parents[node]
            while parent >= 0:
                path, parent = [tokens[parent]] + path, parents[parent]
            with torch.no_grad():
                logits = small_target()(torch.tensor([list(ctx.token_ids) + path])).logits[0, -1]
            rows.append(target_probs(logits, ctx.params))
        return DraftTree(tree.tokens, tree.parents, torch.stack(rows) if rows else None, tree.source)


def first_two_counts(drafter, options: dict, generations: int) -> tuple[torch.Tensor, Counter]:
    generator = SpeculativeGenerator(small_target(), drafter=drafter, controller="static:max_depth=2,max_nodes=6")
    counts, accepted = torch.zeros(SMALL_VOCAB, SMALL_VOCAB, dtype=torch.long), Counter()
    for seed in range(generations):
        out = generator.generate(SAMPLE_PROMPT, max_new_tokens=3, seed=seed, **options)  # first tree: depth 2
        counts[tuple(out.token_ids[:2])] += 1
        accepted.update(out.stats.accepted_hist)
        assert out.stats.drafter_errors == 0
    return counts, accepted


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=1.0, top_k=3)], ids=["t1", "top_k3"])
def test_sampled_drafts_keep_the_target_distribution(options):
    draft = noisy_copy(small_target(), 0.5)
    counts, accepted = first_two_counts(ModelDrafter(draft, topk=3), options, 1500)
    assert {0, 1, 2} <= set(accepted)  # rejections and acceptances down to depth 2
    joint = exact_first_two(SamplingParams(**options))
    p_values = [chi_square_p_value(counts, joint), chi_square_p_value(counts.sum(1), joint.sum(1)),
                chi_square_p_value(counts.sum(0), joint.sum(0))]
    power = chi_square_p_value(counts, distorted(joint))
    print(f"{options}: p-values {[f'{p:.3g}' for p in p_values]}, vs a 5% distortion {power:.2g}", end="")
    assert min(p_values) > ALPHA, p_values
    assert power < ALPHA  # the counts would reveal a 5% distortion
    if "top_k" not in options:  # the same test rejects drafts that carry the wrong q
        wrong, _ = first_two_counts(TargetQDrafter(draft, topk=3), options, 500)
        print(f", wrong q {chi_square_p_value(wrong, joint):.2g}", end="")
        assert chi_square_p_value(wrong, joint) < ALPHA


# ------------------------------------------------------------------------------------------- loading and errors

def test_vocab_mismatch_is_rejected():
    with pytest.raises(ValueError, match=f"drafter vocab 64 != target vocab {VOCAB}"):
        SpeculativeGenerator(target(), drafter=ModelDrafter(fresh_tiny_model("llama", vocab=64, layers=1)))


def test_spec_string_loads_the_draft_on_first_use_in_the_target_dtype(tmp_path):
    copy.deepcopy(draft_model("noisy")).float().save_pretrained(tmp_path)  # a float32 copy on disk
    generator = SpeculativeGenerator(target(), drafter=f"model:path={tmp_path},mode=chain,topk=2")
    assert isinstance(generator.drafter, ModelDrafter) and generator.drafter.model is None
    assert generator.drafter.vocab_size == VOCAB
    tau, _ = run(generator.drafter, "heuristic", prompts=PROMPTS[:1])
    assert generator.drafter.model.dtype == torch.float64 and tau > 1.1
    with pytest.raises(ValueError, match="mode must be"):
        ModelDrafter(target(), mode="beam")
    with pytest.raises(ValueError, match="needs a draft model"):
        ModelDrafter()


@pytest.mark.parametrize("graphs", [False, True])
def test_a_draft_model_with_a_shorter_window_stops_drafting_quietly_at_its_end(graphs):
    """The draft's window (256) ends mid-generation; the target's (512) goes on: plain steps from there, no
    warning, no drafter error, the greedy output unchanged."""
    target = fresh_tiny_model("llama", seed=1)
    draft = copy.deepcopy(target)  # a perfect draft, but with a window of 256
    target.config.max_position_embeddings = 512
    drafter = ModelDrafter(model=draft, mode="tree", graphs=graphs)
    prompt = repetitive_prompt(target.config.vocab_size, seed=5, length=230)
    truth = reference_decode(HFBackend(target), prompt, SamplingParams(), StopRule(60))
    generator = SpeculativeGenerator(target, drafter=drafter, controller="static:max_depth=6,max_nodes=12")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generator.generate(prompt, max_new_tokens=60)
    assert out.token_ids == truth and out.stats.drafter_errors == 0
    assert out.stats.tau > 1.0  # it drafted while the window had room


def test_a_calibrated_tree_follows_the_learnt_acceptance_rates():
    """Scores are the learnt acceptance rates: once the top child was always accepted and the runner-up never, the
    3-node tree is the top-token chain [A, C, A] instead of the probability-best [A, B, C] (B .3 > C .27)."""
    drafter = ModelDrafter(bigram(), topk=2)
    assert propose(drafter, Budget(max_nodes=3, max_depth=4)).tokens.tolist() == [A, B, C]
    for _ in range(200):  # top children (p .45-.6) always accepted, runners-up (p .3-.4) never
        drafter.calibration.observe([-1, -1, 0, 0], [(0, 0.6), (1, 0.3), (0, 0.45), (1, 0.4)], [0, 2])
    drafter.reset()
    tree = propose(drafter, Budget(max_nodes=3, max_depth=4))
    assert (tree.tokens.tolist(), tree.parents.tolist()) == ([A, C, A], [-1, 0, 1])
    assert propose(ModelDrafter(bigram(), topk=2, calibrate=False), Budget(max_nodes=3, max_depth=4)).tokens.tolist() \
        == [A, B, C]
