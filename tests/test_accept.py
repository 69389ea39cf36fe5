"""Tests for specdec.accept.

1. greedy: exact equality with a float64 loop reference that walks the tree node by node;
2. sampling: properties on random trees (a valid accepted path, tokens the target can emit, q == p accepts all);
3. the contract: committed tokens follow the target's distribution exactly (chi-square over many seeded trials),
   and the same check fails on deliberately wrong acceptance rules and on a 5% distortion of the target;
4. bad inputs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec import accept as accept_module
from specdec.accept import Acceptance, accept, greedy_walk
from specdec.sampling import SamplingParams, target_probs
from specdec.tree import DraftTree, depths, path_to

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Thousands of tiny tensor ops: with two intra-op threads on a busy 2-core machine, one tiny CPU softmax can
    take ~8 ms (the threads wait on each other) instead of ~3 us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_ints(acceptance: Acceptance) -> tuple[int, int, int]:
    return int(acceptance.deepest_node), int(acceptance.accepted_len), int(acceptance.bonus_token)


def make_tree(parents: list[int], tokens: list[int], draft_probs: torch.Tensor | None = None) -> DraftTree:
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), draft_probs)


@st.composite
def random_parents(draw, max_nodes: int = 10) -> list[int]:
    """Random topologically ordered parents: parents[i] in [-1, i)."""
    n = draw(st.integers(0, max_nodes))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# 1. greedy against a loop reference


def greedy_reference(parents: list[int], tokens: list[int], logits: torch.Tensor) -> tuple[int, int, int]:
    """Walk from the root: move to the lowest-index child whose token is the argmax at the current row."""
    rows = logits.double().tolist()
    node, depth = -1, 0
    while True:
        row = rows[node + 1]
        best = row.index(max(row))  # the first maximum, like torch.argmax
        matching = [child for child, parent in enumerate(parents) if parent == node and tokens[child] == best]
        if not matching:
            return node, depth, best
        node, depth = matching[0], depth + 1


def logits_with_argmax(best_tokens: list[int], vocab: int = 8, seed: int = 0) -> torch.Tensor:
    """(len(best_tokens), vocab) random logits whose row r has its unique maximum at best_tokens[r]."""
    logits = torch.randn(len(best_tokens), vocab, generator=torch.Generator().manual_seed(seed))
    logits[torch.arange(len(best_tokens)), torch.tensor(best_tokens)] = 10.0
    return logits


CHAIN_PARENTS, CHAIN_TOKENS, CHAIN_ARGMAX = [-1, 0, 1], [3, 1, 4], [3, 1, 4, 2]

GREEDY_CASES = {
    # name: (parents, tokens, argmax per row (row 0 = root, row 1 + i = node i), expected (deepest, len, bonus))
    "chain_all_accepted": (CHAIN_PARENTS, CHAIN_TOKENS, CHAIN_ARGMAX, (2, 3, 2)),
    "chain_none_accepted": (CHAIN_PARENTS, CHAIN_TOKENS, [0, 1, 4, 2], (-1, 0, 0)),
    "chain_stops_at_depth_1": (CHAIN_PARENTS, CHAIN_TOKENS, [3, 7, 4, 2], (0, 1, 7)),
    "chain_stops_at_depth_2": (CHAIN_PARENTS, CHAIN_TOKENS, [3, 1, 7, 2], (1, 2, 7)),
    # the root's second of three children is accepted, then its second child
    "branch_2_of_3": ([-1, -1, -1, 1, 1, 0], [4, 5, 6, 2, 3, 1], [5, 1, 3, 0, 0, 7, 0], (4, 2, 7)),
    # both root children carry the argmax: the lower index wins even though node 1 has an accepted child
    "duplicate_siblings": ([-1, -1, 1], [2, 2, 6], [2, 0, 6, 1], (0, 1, 0)),
    "empty_tree": ([], [], [5], (-1, 0, 5)),
}


@pytest.mark.parametrize("name", GREEDY_CASES)
def test_greedy_hand_built_trees(name: str) -> None:
    parents, tokens, argmax_per_row, expected = GREEDY_CASES[name]
    logits = logits_with_argmax(argmax_per_row)
    assert greedy_reference(parents, tokens, logits) == expected
    assert as_ints(accept(make_tree(parents, tokens), logits, GREEDY)) == expected
    assert greedy_walk(parents, tokens, argmax_per_row) == (expected[0], expected[2])  # verify's host path


def test_greedy_ties_take_the_first_maximum() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert as_ints(accept(make_tree([-1], [2]), logits, GREEDY)) == (-1, 0, 1)
    assert as_ints(accept(make_tree([-1], [1]), logits, GREEDY)) == (0, 1, 0)


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_greedy_matches_loop_reference_on_random_trees(data: st.DataObject) -> None:
    parents = data.draw(random_parents())
    vocab = data.draw(st.integers(2, 6))
    row = st.lists(st.integers(-2, 2), min_size=vocab, max_size=vocab)  # small integers: many ties
    logits = torch.tensor(data.draw(st.lists(row, min_size=len(parents) + 1, max_size=len(parents) + 1)),
                          dtype=torch.float32)
    best = logits.argmax(-1).tolist()
    tokens = [best[parent + 1] if data.draw(st.booleans()) else data.draw(st.integers(0, vocab - 1))
              for parent in parents]
    acceptance = accept(make_tree(parents, tokens), logits, GREEDY)
    expected = greedy_reference(parents, tokens, logits)
    assert as_ints(acceptance) == expected
    assert greedy_walk(parents, tokens, best) == (expected[0], expected[2])  # verify's host path


# ---------------------------------------------------------------------------------------------------------------
# 2. sampling properties on random trees


@st.composite
def sampling_params(draw, vocab: int) -> SamplingParams:
    return SamplingParams(temperature=draw(st.sampled_from([0.5, 1.0, 1.7])), top_k=draw(st.integers(0, vocab)),
                          top_p=draw(st.sampled_from([1.0, 0.9, 0.5])))


def sample_rows(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N,) one token per row of (N, V) probabilities (N may be 0)."""
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def draw_sampling_case(data: st.DataObject, logit_scale: float):
    """A random tree's parents, a vocabulary of 2-8, sampling params, a seeded generator, (N+1, V) Gaussian logits of
    this scale and the target probabilities they give."""
    parents = data.draw(random_parents())
    vocab = data.draw(st.integers(2, 8))
    params = data.draw(sampling_params(vocab))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    logits = torch.randn(len(parents) + 1, vocab, generator=generator) * logit_scale
    return parents, vocab, params, generator, logits, target_probs(logits, params)


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_sampling_commits_an_accepted_path_the_target_can_emit(data: st.DataObject) -> None:
    parents, vocab, params, generator, logits, probs = draw_sampling_case(data, logit_scale=3.0)
    n = len(parents)
    parent_rows = torch.tensor(parents, dtype=torch.long) + 1
    draft_probs = None
    if data.draw(st.booleans(), label="sampled drafts"):
        draft_probs = (torch.randn(n, vocab, generator=generator) * 2).softmax(-1)
        tokens = sample_rows(draft_probs, generator)
    else:  # deterministic drafts, half of them likely under the target
        likely = probs[parent_rows].argmax(-1)
        tokens = torch.where(torch.rand(n, generator=generator) < 0.5, likely,
                             torch.randint(vocab, (n,), generator=generator))
    tree = DraftTree(tokens, parent_rows - 1, draft_probs)

    acceptance = accept(tree, logits, params, generator)

    for field in (acceptance.deepest_node, acceptance.accepted_len, acceptance.bonus_token):
        assert field.dtype == torch.long and field.shape == ()
    deepest, accepted_len, bonus = as_ints(acceptance)
    assert -1 <= deepest < n and 0 <= bonus < vocab
    path = path_to(tree, deepest)
    assert accepted_len == len(path) == (0 if deepest < 0 else int(depths(tree)[deepest]))
    rows = [0] + [node + 1 for node in path]  # each path node's parent row, then the deepest row
    assert all(probs[row, tokens[node]] > 0 for node, row in zip(path, rows))
    assert probs[rows[-1], bonus] > 0
    if draft_probs is None:  # every child of the deepest node was rejected, so its token left the residual
        assert bonus not in {int(tokens[child]) for child in range(n) if parents[child] == deepest}


@given(data=st.data())
@settings(max_examples=100, deadline=None)
def test_draft_equal_to_target_accepts_every_first_child(data: st.DataObject) -> None:
    """q == p gives r(x) / q(x) = 1 for the first child tried at a row: the first-child path is always accepted."""
    parents, vocab, params, generator, logits, probs = draw_sampling_case(data, logit_scale=2.0)
    draft_probs = probs[torch.tensor(parents, dtype=torch.long) + 1]
    tokens = sample_rows(draft_probs, generator)
    tree = DraftTree(tokens, torch.tensor(parents, dtype=torch.long), draft_probs)
    first_child_path = [-1]
    while (children := [c for c, parent in enumerate(parents) if parent == first_child_path[-1]]):
        first_child_path.append(children[0])

    deepest, accepted_len, bonus = as_ints(accept(tree, logits, params, generator))

    assert (deepest, accepted_len) == (first_child_path[-1], len(first_child_path) - 1)
    assert probs[deepest + 1, bonus] > 0


def test_sampling_is_reproducible_from_the_generator() -> None:
    tree = make_tree([-1, -1, 0, 2], [1, 2, 3, 0])
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0)
    runs = [[as_ints(accept(tree, logits, params, generator)) for _ in range(20)]
            for generator in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1  # and it does sample


# ---------------------------------------------------------------------------------------------------------------
# 3. distribution tests: the committed tokens follow the target
#
# The target is a fixed table: the logits after a prefix depend on the prefix's length and last token. The drafter
# is a perturbed copy of it. Each trial drafts a tree, runs accept(), and commits path tokens + bonus; every
# committed token is then one sample of the target in its context, which a chi-square test checks.

VOCAB = 6
ROOT_TOKEN = 0
TRIALS = 8_000
_tables = torch.Generator().manual_seed(1234)
TARGET_LOGITS = torch.randn(6, VOCAB, VOCAB, generator=_tables)  # [prefix length, last token] -> logits
DRAFT_LOGITS = TARGET_LOGITS + torch.randn(6, VOCAB, VOCAB, generator=_tables)

# A drafter policy: (q at the parent (T, V), earlier siblings' tokens (T, S), generator) -> (tokens (T,), q (T, V))
DraftPolicy = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def sampled_with_replacement(q: torch.Tensor, siblings: torch.Tensor, generator: torch.Generator):
    return torch.multinomial(q, 1, generator=generator)[:, 0], q


def sampled_without_replacement(q: torch.Tensor, siblings: torch.Tensor, generator: torch.Generator):
    q = q.scatter(1, siblings, 0.0)
    q = q / q.sum(-1, keepdim=True)
    return torch.multinomial(q, 1, generator=generator)[:, 0], q


def deterministic_top_ranked(q: torch.Tensor, siblings: torch.Tensor, generator: torch.Generator):
    """The drafter's (number of earlier siblings + 1)-th most likely token; the tree carries no draft_probs."""
    return q.argsort(-1, descending=True)[:, siblings.shape[1]], q


@dataclass(frozen=True)
class Scenario:
    parents: tuple[int, ...]
    policy: DraftPolicy
    params: SamplingParams

    @property
    def deterministic(self) -> bool:
        return self.policy is deterministic_top_ranked


SCENARIOS = {
    "chain_sampled": Scenario((-1, 0, 1, 2), sampled_with_replacement, SamplingParams(temperature=1.0)),
    "tree_deterministic_top_p": Scenario((-1, -1, -1, 0, 0, 3, 1), deterministic_top_ranked,
                                         SamplingParams(temperature=0.7, top_p=0.9)),
    "tree_without_replacement_top_k": Scenario((-1, -1, -1, 0, 0, 1, 1, 3), sampled_without_replacement,
                                               SamplingParams(temperature=1.3, top_k=4)),
    "tree_sampled_top_p": Scenario((-1, -1, 0, 0, 2), sampled_with_replacement,
                                   SamplingParams(temperature=0.9, top_p=0.8)),
}


def draft_trees(scenario: Scenario, trials: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (T, N) and per-node draft distributions (T, N, V), each node drafted after its parent."""
    parents = list(scenario.parents)
    node_depth = depths(DraftTree(torch.zeros(len(parents), dtype=torch.long), torch.tensor(parents))).tolist()
    tokens = torch.zeros(trials, len(parents), dtype=torch.long)
    draft_probs = torch.zeros(trials, len(parents), VOCAB)
    for node, parent in enumerate(parents):
        parent_depth, last = (0, torch.full((trials,), ROOT_TOKEN)) if parent < 0 else (node_depth[parent],
                                                                                         tokens[:, parent])
        q = DRAFT_LOGITS[parent_depth, last].softmax(-1)
        siblings = tokens[:, [child for child in range(node) if parents[child] == parent]]
        tokens[:, node], draft_probs[:, node] = scenario.policy(q, siblings, generator)
    return tokens, draft_probs


def committed_sequences(scenario: Scenario, trials: int, seed: int) -> list[list[int]]:
    """Run `trials` speculative steps; each returns its committed tokens (accepted path tokens, then the bonus)."""
    generator = torch.Generator().manual_seed(seed)
    parents = torch.tensor(scenario.parents)
    tokens, draft_probs = draft_trees(scenario, trials, generator)
    node_depth = depths(DraftTree(tokens[0], parents))
    root_logits = TARGET_LOGITS[0, ROOT_TOKEN].expand(trials, 1, VOCAB)
    logits = torch.cat([root_logits, TARGET_LOGITS[node_depth, tokens]], 1)  # (T, N + 1, V)
    steps = []
    for trial in range(trials):
        tree = DraftTree(tokens[trial], parents, None if scenario.deterministic else draft_probs[trial])
        acceptance = accept(tree, logits[trial], scenario.params, generator)
        steps.append(torch.stack([acceptance.deepest_node, acceptance.bonus_token]))
    paths = {node: path_to(DraftTree(tokens[0], parents), node) for node in range(-1, len(scenario.parents))}
    token_rows = tokens.tolist()
    return [[token_rows[trial][node] for node in paths[deepest]] + [bonus]
            for trial, (deepest, bonus) in enumerate(torch.stack(steps).tolist())]


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(dof) (z = that normal quantile), by the Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@dataclass
class FitReport:
    statistic: float = 0.0
    dof: int = 0
    dof_after_the_first_token: int = 0
    impossible_tokens: int = 0  # committed tokens the processed target gives probability 0

    @property
    def fits(self) -> bool:
        return self.impossible_tokens == 0 and self.statistic < chi_square_critical(self.dof)


def fit_to_target(sequences: list[list[int]], params: SamplingParams, min_group: int = 100) -> FitReport:
    """Pearson chi-square of every committed token against the target in its context (prefix length, last token).

    Contexts with fewer than `min_group` samples are skipped; cells expecting < 5 counts are pooled."""
    counts: dict[tuple[int, int], torch.Tensor] = defaultdict(lambda: torch.zeros(VOCAB, dtype=torch.float64))
    for sequence in sequences:
        for position, (last, token) in enumerate(zip([ROOT_TOKEN] + sequence, sequence)):
            counts[(position, last)][token] += 1
    report = FitReport()
    for (position, last), observed in counts.items():
        expected_probs = target_probs(TARGET_LOGITS[position, last], params).double()
        report.impossible_tokens += int(observed[expected_probs == 0].sum())
        total = observed.sum()
        if total < min_group:
            continue
        expected = expected_probs * total
        small = (expected < 5) & (expected_probs > 0)
        cells = expected >= 5
        observed_cells = torch.cat([observed[cells], observed[small].sum().reshape(1)])
        expected_cells = torch.cat([expected[cells], expected[small].sum().reshape(1)])
        kept = expected_cells > 0
        report.statistic += float(((observed_cells - expected_cells)[kept] ** 2 / expected_cells[kept]).sum())
        dof = int(kept.sum()) - 1
        report.dof += dof
        report.dof_after_the_first_token += dof if position > 0 else 0
    return report


@pytest.mark.parametrize("name", SCENARIOS)
def test_committed_tokens_follow_the_target(name: str) -> None:
    scenario = SCENARIOS[name]
    sequences = committed_sequences(scenario, TRIALS, seed=1)
    report = fit_to_target(sequences, scenario.params)
    assert report.dof_after_the_first_token >= 2 * (VOCAB - 1), "too few accepted drafts to test second tokens"
    assert sum(len(sequence) > 2 for sequence in sequences) > TRIALS // 20, "too few accepted depth-2 paths"
    assert report.fits, report


def residual_is_never_updated(row_residual: torch.Tensor, tree: DraftTree, children: torch.Tensor) -> torch.Tensor:
    """Wrong: after a rejection, resample from r instead of normalize(max(r - q, 0))."""
    return row_residual


def draft_probability_ignored(tree: DraftTree) -> torch.Tensor:
    """Wrong: accept with probability min(1, r(x)) as if every draft were deterministic, ignoring q(x)."""
    return torch.ones(len(tree))


def draft_probability_overestimated(factor: float) -> Callable[[DraftTree], torch.Tensor]:
    """Subtly wrong: accept with probability min(1, r(x) / (factor * q(x))). This moves the first committed
    token's distribution from the target's by total variation 0.058 in chain_sampled with factor 1.1, and by 0.042
    in tree_sampled_top_p with factor 1.2 (computed exactly by enumerating the root's drafts)."""
    true_draft_prob_of_own_token = accept_module._draft_prob_of_own_token
    return lambda tree: factor * true_draft_prob_of_own_token(tree)


@pytest.mark.parametrize("name, helper, wrong, trials", [
    pytest.param("chain_sampled", "_draft_prob_of_own_token", draft_probability_overestimated(1.1), TRIALS,
                 id="chain_sampled-q_overestimated_10%"),
    pytest.param("tree_sampled_top_p", "_draft_prob_of_own_token", draft_probability_overestimated(1.2), TRIALS,
                 id="tree_sampled_top_p-q_overestimated_20%"),
    # gross errors, caught by a wide margin with a quarter of the trials
    pytest.param("tree_deterministic_top_p", "_residual_after_rejection", residual_is_never_updated, TRIALS // 4,
                 id="tree_deterministic_top_p-residual_never_updated"),
    pytest.param("tree_sampled_top_p", "_residual_after_rejection", residual_is_never_updated, TRIALS // 4,
                 id="tree_sampled_top_p-residual_never_updated"),
    pytest.param("tree_without_replacement_top_k", "_draft_prob_of_own_token", draft_probability_ignored,
                 TRIALS // 4, id="tree_without_replacement_top_k-q_ignored"),
])
def test_the_distribution_check_fails_on_wrong_acceptance(name: str, helper: str, wrong: Callable, trials: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accept_module, helper, wrong)
    scenario = SCENARIOS[name]
    assert not fit_to_target(committed_sequences(scenario, trials, seed=1), scenario.params).fits


def test_the_distribution_check_passes_the_target_and_catches_a_5_percent_distortion() -> None:
    """Two-token sequences drawn straight from the target fit; moving 5% of the first token's probability between
    its two most likely values (total variation 0.05) is caught at the same number of trials."""
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(5)
    root = target_probs(TARGET_LOGITS[0, ROOT_TOKEN], params)
    top_two = root.topk(2).indices
    distorted_root = root.clone()
    distorted_root[top_two] += torch.tensor([-0.05, 0.05])
    for first_token_probs, should_fit in ((root, True), (distorted_root, False)):
        first = torch.multinomial(first_token_probs, TRIALS, replacement=True, generator=generator)
        second = torch.multinomial(target_probs(TARGET_LOGITS[1, first], params), 1, generator=generator)[:, 0]
        sequences = torch.stack([first, second], 1).tolist()
        assert fit_to_target(sequences, params).fits == should_fit


# ---------------------------------------------------------------------------------------------------------------
# 4. bad inputs


def test_logits_rows_must_be_nodes_plus_one() -> None:
    with pytest.raises(ValueError, match=r"\(N \+ 1, V\) = \(3, V\)"):
        accept(make_tree([-1, 0], [1, 2]), torch.randn(2, 5), GREEDY)
    with pytest.raises(ValueError, match=r"\(N \+ 1, V\)"):
        accept(make_tree([], []), torch.randn(5), GREEDY)


def test_draft_vocab_must_match_target_vocab() -> None:
    tree = make_tree([-1], [1], draft_probs=torch.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="draft_probs vocab 4 != target vocab 5"):
        accept(tree, torch.randn(2, 5), SamplingParams(temperature=1.0))


def test_tree_must_be_on_the_logits_device() -> None:
    with pytest.raises(ValueError, match=r"tree\.to\(logits\.device\)"):
        accept(make_tree([-1], [1]), torch.empty(2, 5, device="meta"), GREEDY)
