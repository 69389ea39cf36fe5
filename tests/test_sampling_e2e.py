"""End-to-end losslessness of speculative *sampling*: the first 3 tokens the real generator samples follow the
target's exact distribution, enumerated from the model over a vocabulary of 8 (8^3 = 512 sequences).

Drafts are deterministic (ngram trees) or sampled from fixed random distributions q != p that the drafter reports
as `draft_probs` (siblings drawn independently, or without replacement). Chi-square tests on the joint of the 3
tokens and on each position's marginal; every seed is fixed, so the test is deterministic. Each test also shows its
power: the same counts reject a distribution with 5% of the mass moved between two likely sequences.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.sampling import SamplingParams, target_probs
from specdec.tree import DraftTree
from specdec.drafters.model import ModelDrafter
from tiny_models import chi_square_p_value, distorted, fresh_tiny_model, single_thread, tiny_model

VOCAB = 8
STEPS = 3  # tokens per generation whose joint distribution is tested
PROMPT = [0, 1, 1, 5, 0, 1, 5, 1, 0, 1]  # "0 1" was followed by "1 5" and "5 1", both likely: a two-branch tree
ALPHA = 1e-4  # per statistic; with fixed seeds the outcome is fixed, this only sets how strict it is


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def model():
    return tiny_model("llama", vocab=VOCAB, init_range=0.2, layers=1)  # peaky, uneven next-token distributions


def exact_joint(params: SamplingParams) -> torch.Tensor:
    """(V, V, V) float64: the probability of each first-3-token sequence under the target, by enumeration."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # (V*V, 2): all (x1, x2)
    ids = torch.cat([torch.tensor(PROMPT).expand(len(pairs), -1), pairs], dim=1)
    with torch.no_grad():
        logits = model()(ids).logits[:, len(PROMPT) - 1:]  # rows: after the prompt, after x1, after x2
    probs = target_probs(logits, params).double()
    first = probs[0, 0]                                  # (V,)
    second = probs[::VOCAB, 1]                           # (V, V): [x1, x2]
    third = probs[:, 2].reshape(VOCAB, VOCAB, VOCAB)     # [x1, x2, x3]
    return first[:, None, None] * second[:, :, None] * third


def assert_target_distribution(counts: torch.Tensor, joint: torch.Tensor) -> None:
    n = int(counts.sum())
    tv = 0.5 * float((counts.double() / n - joint).abs().sum())
    p_values = {"joint": chi_square_p_value(counts, joint)}
    for position in range(STEPS):
        other = tuple(d for d in range(STEPS) if d != position)
        p_values[f"x{position + 1}"] = chi_square_p_value(counts.sum(other), joint.sum(other))
    assert min(p_values.values()) > ALPHA, f"not the target distribution: p-values {p_values}, TV {tv:.3f}"
    power = chi_square_p_value(counts, distorted(joint))
    assert power < ALPHA, f"these counts would not reveal a 5% distortion (p = {power:.2g}): raise the sample size"


class SampledTreeDrafter:
    """Drafts 2 root children from q_root and one child below each from q_child[parent token] (all != p), and
    reports those distributions as draft_probs. `replace=False` draws the second root child without replacement
    (its q is q_root without the first token, renormalised)."""

    vocab_size = VOCAB

    def __init__(self, replace: bool = True, seed: int = 0):
        torch.manual_seed(seed)
        self.q_root = (torch.randn(VOCAB, dtype=torch.float64) * 1.5).softmax(-1)
        self.q_child = (torch.randn(VOCAB, VOCAB, dtype=torch.float64) * 1.5).softmax(-1)
        self.replace = replace
        self.rng = torch.Generator().manual_seed(seed + 1)

    def propose(self, ctx):
        first = self._draw(self.q_root)
        q_second = self.q_root.clone()
        if not self.replace:
            q_second[first] = 0.0
            q_second /= q_second.sum()
        second = self._draw(q_second)
        tokens, parents, rows = [first, second], [-1, -1], [self.q_root, q_second]
        if ctx.budget.max_depth >= 2:
            for parent in (0, 1):
                q = self.q_child[tokens[parent]]
                tokens.append(self._draw(q))
                parents.append(parent)
                rows.append(q)
        return DraftTree(torch.tensor(tokens), torch.tensor(parents), draft_probs=torch.stack(rows))

    def _draw(self, q: torch.Tensor) -> int:
        return int(torch.multinomial(q, 1, generator=self.rng))

    def observe(self, result):
        pass

    def reset(self):
        pass


CASES = {
    # name: (drafter factory, sampling options, generations[, backend])
    "t0.7-ngram": (lambda: "ngram:max_n=2,max_matches=3", dict(temperature=0.7), 2000),
    "t0.7-sampled": (lambda: SampledTreeDrafter(replace=True), dict(temperature=0.7), 2000),
    "top_k-sampled-no-replacement": (lambda: SampledTreeDrafter(replace=False, seed=1),
                                     dict(temperature=1.0, top_k=3), 1500),
    "top_p-sampled": (lambda: SampledTreeDrafter(replace=True, seed=2), dict(temperature=0.9, top_p=0.8), 1500),
    # a model drafter that learns online, its weights swapped between generations (~50 times here; the gate refuses the rest)
    "t0.7-model-learning-online": (lambda: ModelDrafter(fresh_tiny_model("llama", vocab=VOCAB, init_range=0.2,
                                                                         layers=1, seed=5).float(),
                                                        topk=2, online=True, online_every=96, online_lr=2e-3,
                                                        online_background=False), dict(temperature=0.7), 2000),
    # the fast path's bucketed static steps (CUDA graphs on a GPU, the same code here) under the same test
    "t0.7-sampled-graph-backend": (lambda: SampledTreeDrafter(replace=True, seed=3), dict(temperature=0.7), 2000,
                                   "graph"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_tokens_follow_the_target_distribution(case):
    make_drafter, options, generations, *backend = CASES[case]
    generator = SpeculativeGenerator(model(), drafter=make_drafter(), controller="static:max_depth=2,max_nodes=6",
                                     backend=backend[0] if backend else None)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.long)
    accepted_hist, drafted = Counter(), 0
    for seed in range(generations):
        out = generator.generate(PROMPT, max_new_tokens=STEPS, seed=seed, **options)
        counts[tuple(out.token_ids)] += 1
        accepted_hist.update(out.stats.accepted_hist)
        drafted += out.stats.drafted_nodes
        assert out.stats.drafter_errors == 0
    # drafts were rejected and accepted, down to depth 2: the test exercised the acceptance rule, not just sampling
    assert {0, 1, 2} <= set(accepted_hist) and drafted >= 3 * generations
    if getattr(generator.drafter, "learner", None) is not None:  # the weights did change, many times
        assert generator.drafter.version >= 30, generator.drafter.learner.report()
    assert_target_distribution(counts, exact_joint(SamplingParams(**options)))


def test_exact_joint_is_a_distribution():
    for options in (dict(temperature=0.7), dict(temperature=1.0, top_k=3), dict(temperature=0.9, top_p=0.8)):
        joint = exact_joint(SamplingParams(**options))
        assert joint.sum().item() == pytest.approx(1.0, abs=1e-6) and bool((joint >= 0).all())
    top_k = exact_joint(SamplingParams(temperature=1.0, top_k=3))
    assert int((top_k.sum((1, 2)) > 0).sum()) == 3  # at most 3 first tokens possible
