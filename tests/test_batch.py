"""Batched speculative decoding (`specdec.batch`): every row's output equals its batch-1 plain decoding, whatever
the batch size, the prompts' lengths and order, rows finishing early, drafters right, wrong or random; each row's
samples follow the target's distribution; bad batches are refused naming the prompt."""

from __future__ import annotations

import functools
import random
from collections import Counter

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.batch import BatchAllocator, BatchGate, BatchedStaticBackend, prefill_runs
from specdec.drafters import register_drafter
from specdec.tree import DraftTree, subtree
from tiny_models import (chi_square_p_value, distorted, fresh_tiny_model, greedy_truth, repetitive_prompt,
                         single_thread, tiny_model, tiny_tokenizer)

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@register_drafter("test_batch_oracle")
class OracleDrafter:
    """Proposes the target's own greedy continuation (a chain), read from `TRUTH[prompt]`: always accepted."""

    vocab_size = None
    truth: dict = {}

    def propose(self, ctx):
        prompt = next(p for p in self.truth if list(ctx.token_ids[: len(p)]) == list(p))
        done = len(ctx.token_ids) - len(prompt)
        chain = self.truth[prompt][done: done + ctx.budget.max_depth]
        return DraftTree.chain(chain) if chain else DraftTree.empty()

    def observe(self, result):
        pass

    def reset(self):
        pass


@register_drafter("test_batch_noise")
class NoiseDrafter:
    """always_wrong=True: tokens the target never picks next (a tree of 3); else random trees of random tokens."""

    vocab_size = None

    def __init__(self, always_wrong: bool = False, seed: int = 0):
        self.always_wrong, self.rng = always_wrong, random.Random(seed)

    def propose(self, ctx):
        size = min(ctx.budget.max_nodes, 3 if self.always_wrong else self.rng.randint(1, 6))
        tokens = [VOCAB - 1 - i for i in range(size)] if self.always_wrong else \
            [self.rng.randrange(VOCAB) for _ in range(size)]
        parents = [-1] + [self.rng.randrange(i) - (0 if self.always_wrong else 1) for i in range(1, size)]
        parents = [max(p, -1) for p in parents]
        depth = []
        for parent in parents:
            depth.append(1 if parent < 0 else depth[parent] + 1)
        keep = [node for node in range(size) if depth[node] <= ctx.budget.max_depth]
        return subtree(DraftTree(torch.tensor(tokens), torch.tensor(parents)), keep)

    def observe(self, result):
        pass

    def reset(self):
        pass


@functools.cache
def eos_model():
    """A model whose EOS is a token its greedy answers reach mid-way now and then: some rows end early."""
    model = fresh_tiny_model("llama", init_range=0.1)
    counts = Counter(token for p in prompts(12, seed=99) for token in greedy_truth(model, tuple(p), 24)[4:])
    model.generation_config.eos_token_id = counts.most_common(1)[0][0]
    return model


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [repetitive_prompt(VOCAB, seed=seed * 100 + i, length=rng.randint(3, 30)) for i in range(count)]


@pytest.mark.parametrize("batch_size", [1, 3, 8, 17])
@pytest.mark.parametrize("drafter", ["ngram", "test_batch_oracle", "test_batch_noise:always_wrong=True",
                                     "test_batch_noise:seed=3"])
def test_every_row_equals_its_batch_one_plain_decoding(batch_size, drafter, monkeypatch):
    if drafter == "test_batch_oracle":  # its tau is checked: no timing-driven plain steps or cuts (tested apart)
        monkeypatch.setattr(BatchGate, "speculate", lambda self: True)
        monkeypatch.setattr(BatchAllocator, "cost", lambda self, widths: [1.0] * len(widths))
    model = eos_model()
    batch = prompts(20, seed=batch_size)
    truth = {tuple(p): greedy_truth(model, tuple(p), 24, model.generation_config.eos_token_id) for p in batch}
    OracleDrafter.truth = truth
    generator = SpeculativeGenerator(model, drafter=drafter, controller="static:max_depth=4,max_nodes=6")
    outputs = generator.generate(batch, max_new_tokens=24, batch_size=batch_size)
    assert [out.token_ids for out in outputs] == [truth[tuple(p)] for p in batch]
    assert all(out.stats.drafter_errors == 0 for out in outputs)
    assert any(len(out.token_ids) < 24 for out in outputs), "no row ended early: the test would not refill rows"
    if drafter == "test_batch_oracle":
        assert all(out.stats.tau > 2 for out in outputs if len(out.token_ids) > 8)
    # the same prompts in another order: the same answer per prompt
    order = list(range(len(batch)))
    random.Random(batch_size).shuffle(order)
    shuffled = generator.generate([batch[i] for i in order], max_new_tokens=24, batch_size=batch_size)
    assert [out.token_ids for out in shuffled] == [truth[tuple(batch[i])] for i in order]


def test_stale_kv_past_each_rows_length_changes_nothing():
    """After every commit, the slots past each row's length are overwritten with huge values: never read."""
    model = eos_model()
    batch = prompts(9, seed=5)
    original = BatchedStaticBackend.commit

    def commit_then_poison(self, paths):
        original(self, paths)
        for row, length in enumerate(self.lengths):
            self.buffer[:, :, row, :, length:, :] = 1e4

    generator = SpeculativeGenerator(model, drafter="test_batch_noise:seed=1",
                                     controller="static:max_depth=3,max_nodes=5")
    BatchedStaticBackend.commit = commit_then_poison
    try:
        outputs = generator.generate(batch, max_new_tokens=20, batch_size=4)
    finally:
        BatchedStaticBackend.commit = original
    eos = model.generation_config.eos_token_id
    assert [out.token_ids for out in outputs] == [greedy_truth(model, tuple(p), 20, eos) for p in batch]


def test_each_row_samples_from_the_target_distribution(monkeypatch):
    """One prompt in every row of batches of 5; the first two tokens' joint over 1,200 rows (prompt i samples with
    seed + i) against the exact joint of the target. The batch always speculates here (the gate's choice follows
    timings; the test needs the acceptance rule exercised), and the allocator's cost is pinned so that it cuts the
    sampled trees (to fewer of their sibling draws) often: a cut tree is verified exactly too."""
    monkeypatch.setattr(BatchGate, "speculate", lambda self: True)
    allocate, cuts = BatchAllocator.allocate, []

    def counted(self, trees):
        out = allocate(self, trees)
        cuts.append(sum(len(a) - len(b) for a, b in zip(trees, out) if a is not None))
        return out

    monkeypatch.setattr(BatchAllocator, "cost", lambda self, widths: [1.0 + 0.2 * (w - 1) for w in widths])
    monkeypatch.setattr(BatchAllocator, "allocate", counted)
    vocab = 8
    model = tiny_model("llama", vocab=vocab, init_range=0.2, layers=1)
    prompt = [0, 1, 1, 5, 0, 1, 5, 1, 0, 1]
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    with torch.no_grad():
        logits = model(torch.cat([torch.tensor(prompt).expand(len(pairs), -1), pairs], 1)).logits
    probs = logits[:, len(prompt) - 1: len(prompt) + 1].double().div(0.8).softmax(-1)
    joint = probs[0, 0][:, None] * probs[::vocab, 1]  # p(x1) p(x2 | x1): rows x1 * V + x2, any x2 gives x1's
    generator = SpeculativeGenerator(model, drafter="ngram:max_n=2,max_matches=3",
                                     controller="static:max_depth=2,max_nodes=4")
    outputs = generator.generate([prompt] * 1200, max_new_tokens=2, temperature=0.8, seed=0, batch_size=5)
    counts = torch.zeros(vocab, vocab, dtype=torch.long)
    for out in outputs:
        counts[tuple(out.token_ids)] += 1
    assert chi_square_p_value(counts, joint) > 1e-4
    assert chi_square_p_value(counts, distorted(joint, 0.1)) < 1e-4  # the test could see a 10% distortion
    assert sum(out.stats.accepted_hist.get(1, 0) + out.stats.accepted_hist.get(2, 0) for out in outputs) > 100
    assert sum(1 for cut in cuts if cut) > 20  # the sampled trees were cut (to fewer of their siblings) often


def test_bad_batches_are_refused_naming_the_prompt():
    model = tiny_model("llama")
    generator = SpeculativeGenerator(model, drafter="ngram")
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            generator.generate([[1, 2, 3]], batch_size=bad)
    with pytest.raises(ValueError, match="prompt 1 is a string but prompt 0 is a list of token ids"):
        generator.generate([[1, 2, 3], "abab"], batch_size=2)
    window = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="prompt 2: the prompt has .* context window"):
        generator.generate([[1, 2], [3, 4], [5] * (window + 1)], batch_size=2)
    with pytest.raises(ValueError, match="prompt 1: token ids .* outside the target's vocabulary"):
        generator.generate([[1, 2], [3, VOCAB + 4]], batch_size=2)
    with pytest.raises(ValueError, match="pass them by name or spec"):
        SpeculativeGenerator(model, drafter=NoiseDrafter()).generate([[1, 2], [3, 4]], batch_size=2)


def test_the_batch_benchmark_measures_each_method_against_batched_ar_at_the_same_size():
    from specdec.evals.batch_bench import markdown, run_batches
    from specdec.evals.methods import BenchContext
    from specdec.sampling import SamplingParams

    model = eos_model()
    context = BenchContext(model, None, SamplingParams(), "static:max_depth=4,max_nodes=6")
    OracleDrafter.truth = {tuple(p): greedy_truth(model, tuple(p), 12, model.generation_config.eos_token_id)
                           for p in prompts(7, seed=4)}
    result = run_batches(context, prompts(7, seed=4), ["ar", "ngram", "test_batch_oracle"], [1, 3], 12)
    assert [(r["batch_size"], r["method"]) for r in result["rows"]] == [
        (1, "ar"), (1, "ngram"), (1, "test_batch_oracle"), (3, "ar"), (3, "ngram"), (3, "test_batch_oracle")]
    assert all(r["identical_to_ar"] == 7 and r["near_ties"] == r["algorithmic"] == 0 for r in result["rows"])
    assert all(r["speedup"] == 1.0 for r in result["rows"] if r["method"] == "ar")
    assert markdown(result).count("\n") == 2 + 6
    assert all(r["steps"]["steps"]["speculative"] == 0 for r in result["rows"] if r["method"] == "ar")
    assert all(r["steps"]["steps"]["speculative"] > 0 for r in result["rows"] if r["method"] == "test_batch_oracle")
    with pytest.raises(ValueError, match="needs 'ar'"):
        run_batches(context, prompts(2), ["ngram"], [1], 4)


def test_the_batch_benchmark_times_methods_in_turn_and_reports_the_median_run(monkeypatch):
    import specdec.batch
    from specdec.evals import batch_bench
    from specdec.evals.methods import BenchContext
    from specdec.sampling import SamplingParams

    context = BenchContext(eos_model(), None, SamplingParams(), "static:max_depth=4,max_nodes=6")
    calls, decode = [], specdec.batch.decode_batch
    monkeypatch.setattr(specdec.batch, "decode_batch", lambda gen, chosen, size, options, plain=False, **kw: (
        calls.append("ar" if plain else "ngram"), decode(gen, chosen, size, options, plain=plain, **kw))[1])
    result = batch_bench.run_batches(context, prompts(4, seed=2), ["ar", "ngram"], [2], 8, runs=3)
    assert calls[1:] == ["ar", "ngram"] + ["ar", "ngram"] * 3  # batch-1 reference, warm-ups, then the runs in turn
    assert result["runs"] == 3
    for row in result["rows"]:
        assert len(row["seconds_runs"]) == 3 and row["seconds"] == sorted(row["seconds_runs"])[1]
        assert row["tokens_per_s"] == row["tokens"] / row["seconds"] and row["identical_to_ar"] == 4
    assert all(" (" in line for line in batch_bench.markdown(result).splitlines()[2:])  # each rate shows its spread
    with pytest.raises(ValueError, match="--runs must be an integer >= 1"):
        batch_bench.run_batches(context, prompts(2), ["ar"], [1], 4, runs=0)


@pytest.mark.parametrize("static", [False, True])
def test_hf_batched_peers_give_each_prompt_its_greedy_answer(static):
    """HF's batched `generate`, dynamic or static cache (every batch padded to one shape, the last one filled with
    copies that are not returned): left padding changes nothing in float32 on this tiny model."""
    from specdec.evals.batch_bench import hf_batched
    from specdec.evals.methods import BenchContext
    from specdec.sampling import SamplingParams

    model = eos_model()
    batch = prompts(5, seed=6)
    truth = [greedy_truth(model, tuple(p), 6, model.generation_config.eos_token_id) for p in batch]
    answers = hf_batched(BenchContext(model, None, SamplingParams()), batch, 3, 6, static=static)
    assert answers == truth


@pytest.mark.parametrize("spec_rate, plain_rate", [(30.0, 10.0), (10.0, 30.0)])
def test_the_batch_gate_follows_the_faster_kind_and_probes_the_other_ever_more_rarely(spec_rate, plain_rate):
    gate, choices = BatchGate(), []
    for _ in range(200):  # a synthetic trace: each kind's steps commit tokens at its own fixed rate
        speculative = gate.speculate()
        choices.append(speculative)
        gate.observe(speculative, 12, 12 / (spec_rate if speculative else plain_rate))
    faster = spec_rate > plain_rate
    assert choices[:2] == [True, False]  # each kind measured once, speculative first
    assert sum(choice == faster for choice in choices) > 180
    probes = [i for i, choice in enumerate(choices) if i > 1 and choice != faster]
    gaps = [later - earlier for earlier, later in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 32  # doubling while the probes lose


def test_the_batch_gate_keeps_expensive_probes_to_a_small_share_of_the_time():
    """A GPU's large batch: a speculative step costs 5 plain steps of host time (48 drafters, acceptance, commit)
    for 1.8x their tokens. Probing at doubling gaps alone would cost ~10% over 300 steps; the gaps are sized so the
    probes' loss stays near PROBE_SHARE (the two first measurements aside)."""
    gate = BatchGate()

    def rate_over(steps: int) -> float:
        seconds, tokens = 0.0, 0
        for _ in range(steps):
            speculative = gate.speculate()
            step_s, made = (0.014, 86) if speculative else (0.0028, 48)
            gate.observe(speculative, made, step_s)
            seconds, tokens = seconds + step_s, tokens + made
        return tokens / seconds

    assert rate_over(300) >= 0.96 * 48 / 0.0028
    assert rate_over(300) >= 0.98 * 48 / 0.0028  # a gate kept from an earlier batch (`kept_policy`) probes rarely


def test_a_generators_batches_of_one_size_share_their_gate_and_report_their_steps():
    """The gate and allocator carry over between batched calls of one size (`kept_policy`); `batch_stats` counts the
    last call's steps, rows and tokens by kind, times each phase, and the rows' starts outside the steps."""
    model = eos_model()
    batch = prompts(6, seed=7)
    generator = SpeculativeGenerator(model, drafter="ngram", controller="static:max_depth=4,max_nodes=6")
    outputs = generator.generate(batch, max_new_tokens=12, batch_size=4)
    stats = generator.batch_stats
    assert sum(stats.tokens.values()) == sum(len(out.token_ids) for out in outputs)
    assert sum(stats.row_steps.values()) == sum(out.stats.target_forwards for out in outputs)
    assert stats.steps["speculative"] >= 1 and sum(stats.widths.values()) == stats.steps["speculative"]
    spec_ms = stats.per_step_ms("speculative")
    assert set(spec_ms) == {"draft", "allocate", "score", "accept", "commit", "bookkeeping"}
    assert spec_ms["score"] > 0 and spec_ms["draft"] > 0
    assert stats.starts["rows"] == 6 and stats.starts["prefill_s"] > 0 and stats.starts["setup_s"] > 0
    assert stats.as_dict()["starts"] == stats.starts  # the batch bench's batch.json keeps them
    (gate, allocator), = generator.batch_policies.values()
    steps_seen = gate.sums[True][2] + gate.sums[False][2]
    generator.generate(batch, max_new_tokens=12, batch_size=4)
    assert generator.batch_policies[(4, True)] == (gate, allocator)
    assert steps_seen > 0 and generator.batch_stats is not stats
    generator.generate(batch, max_new_tokens=12, batch_size=2)
    assert set(generator.batch_policies) == {(4, True), (2, True)}


@register_drafter("test_batch_counted")
class CountedDrafter(NoiseDrafter):
    """`NoiseDrafter` that counts its proposals (all instances together)."""

    calls = 0

    def propose(self, ctx):
        CountedDrafter.calls += 1
        return super().propose(ctx)


def test_rows_whose_drafts_keep_missing_sit_out_ever_longer(monkeypatch):
    """Always-wrong drafts: after two misses a row sits out 1, 2, 4, ... speculative steps, so it drafts in far
    fewer than all of them; every row still gets its batch-1 answer."""
    monkeypatch.setattr(BatchGate, "speculate", lambda self: True)
    model = eos_model()
    batch = prompts(4, seed=11)
    CountedDrafter.calls = 0
    generator = SpeculativeGenerator(model, drafter="test_batch_counted:always_wrong=True",
                                     controller="static:max_depth=3,max_nodes=3")
    outputs = generator.generate(batch, max_new_tokens=40, batch_size=4)
    eos = model.generation_config.eos_token_id
    assert [out.token_ids for out in outputs] == [greedy_truth(model, tuple(p), 40, eos) for p in batch]
    row_steps = generator.batch_stats.row_steps["speculative"]
    assert row_steps >= 60 and CountedDrafter.calls <= row_steps // 3


def _tree(parents: list[int]) -> DraftTree:
    return DraftTree(torch.arange(len(parents)), torch.tensor(parents))


def test_the_batch_allocator_keeps_what_a_flat_cost_pays_for_and_cuts_on_a_steep_one():
    chain, bush = _tree([-1, 0, 1, 2, 3, 4]), _tree([-1, -1, 0, 0, 1, 2, 4])
    flat = BatchAllocator()
    flat.observe_cost(1, 0.010)  # one width measured: the others cost the same (the optimistic guess)
    assert flat.allocate([chain, None, bush]) == [chain, None, bush]
    steep = BatchAllocator()
    steep.observe_cost(1, 0.010)
    steep.observe_cost(8, 0.080)  # a line through both: each query costs as much as the root
    cut = steep.allocate([chain, bush])  # each row keeps its best node: the acceptance model keeps learning
    assert [tree.host_parents for tree in cut] == [(-1,), (-1,)] and [tree.origin for tree in cut] == [(0,), (0,)]
    assert steep.trimmed == len(chain) + len(bush) - 2


def test_the_batch_allocator_picks_the_best_common_width_and_keeps_closed_subtrees():
    allocator = BatchAllocator()
    for _ in range(40):  # chains: the first two drafted tokens accepted, the rest never
        allocator.observe_tree(_tree([-1, 0, 1, 2]), [0, 1])
    allocator.observe_cost(1, 0.010)
    allocator.observe_cost(5, 0.014)  # 1 ms per query past the root
    rows = [_tree([-1, 0, 1, 2]), _tree([-1, -1, 0, 1, 2, 0]), _tree([-1])]
    kept = allocator.allocate(rows)
    seconds = allocator.cost(range(1, 8))  # widths 1..7: n = 0..6 nodes a row
    values = [sorted(allocator.acceptance.values(tree.host_parents).tolist(), reverse=True) for tree in rows]
    best = max(range(7), key=lambda n: (3 + sum(sum(v[:n]) for v in values)) / seconds[n])
    assert [len(tree) for tree in kept] == [min(best, len(tree)) for tree in rows] and best == 2
    for before, after in zip(rows, kept):
        origin = after.origin or tuple(range(len(after)))
        assert all(p < 0 or before.host_parents[origin[i]] == origin[p] for i, p in enumerate(after.host_parents))
        assert list(after.host_tokens) == [before.host_tokens[o] for o in origin]


def test_the_batch_allocator_costs_a_width_as_its_bucket_and_fills_it():
    """On a cache with graphs a step runs at the next bucket's width: 3 nodes cost what 4 queries cost, so a
    4-query bucket is filled rather than cut to 3 queries."""
    chain = _tree([-1, 0, 1, 2, 3, 4, 5])
    bucketed = BatchAllocator(buckets=(1, 2, 4, 8))
    for _ in range(40):
        bucketed.observe_tree(chain, [0, 1, 2])
    bucketed.observe_cost(1, 0.010)
    bucketed.observe_cost(3, 0.030)  # a step of width 3 ran as the 4-wide graph
    high = 0.030 + 4 * 0.020 / 3  # bucket 8: on the line through widths 1 and 4
    assert bucketed.cost([3, 4, 5, 8]) == pytest.approx([0.030, 0.030, high, high])
    assert len(bucketed.allocate([chain])[0]) == 3  # width 4: the bucket's every query used


def test_the_batch_allocators_cost_uses_measured_widths_and_a_line_between_them():
    allocator = BatchAllocator(decay=0.5)
    assert allocator.cost([1, 9]) == [1.0, 1.0]  # nothing measured: all alike
    allocator.observe_cost(3, 0.030)
    assert allocator.cost([1, 3, 9]) == [0.030] * 3
    allocator.observe_cost(5, 0.050)
    allocator.observe_cost(5, 0.050)
    low, mid, high = allocator.cost([1, 4, 9])
    assert abs(mid - 0.040) < 1e-9 and abs(high - 0.090) < 1e-9 and abs(low - 0.010) < 1e-9


@pytest.mark.parametrize("options", [dict(max_new_tokens=20), dict(max_new_tokens=20, stop=["ab"]),
                                     dict(max_new_tokens=16, temperature=0.9, seed=4)])
def test_a_batched_stream_yields_each_rows_chunks_that_add_up_to_its_output(options):
    generator = SpeculativeGenerator(tiny_model("mistral"), tokenizer=tiny_tokenizer(), drafter="ngram",
                                     controller="static:max_depth=4,max_nodes=6")
    texts = ["abcdabcdabcdab", "ghghghgh", "abababcdcdcd" * 3, "cdcd", "hgfedcbahgfedcba"]
    stream = generator.stream(texts, batch_size=3, **options)
    chunks = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as done:
            returned = done.value
            break
    assert {chunk.index for chunk in chunks} == set(range(len(texts)))
    first_of = [min(i for i, c in enumerate(chunks) if c.index == k) for k in range(len(texts))]
    last_of = [max(i for i, c in enumerate(chunks) if c.index == k) for k in range(len(texts))]
    assert first_of[1] < last_of[0] and first_of[2] < last_of[0]  # three rows at once: their chunks interleave
    assert min(last_of[:3]) < first_of[3]  # the fourth prompt waits for a free row
    for index, out in enumerate(returned):
        mine = [chunk for chunk in chunks if chunk.index == index]
        assert [t for chunk in mine for t in chunk.token_ids] == out.token_ids
        assert "".join(chunk.text for chunk in mine) == out.text == generator.tokenizer.decode(out.token_ids)
    if not options.get("temperature"):  # greedy: each row's output is its batch-1 output. (Sampled ones follow the
        # target's distribution, but the draws a tree consumes follow the gate's and allocator's timed choices.)
        assert [out.token_ids for out in returned] == [generator.generate(t, **options).token_ids for t in texts]


def test_rows_prefilled_together_hold_what_each_prefilled_alone_holds():
    model = tiny_model("llama")
    batch = [p[:-1] for p in prompts(5, seed=7)]
    alone, together = BatchedStaticBackend(model, 5, max_len=64), BatchedStaticBackend(model, 5, max_len=64)
    for row, token_ids in enumerate(batch):
        alone.prefill_row(row, token_ids)
    together.prefill_rows(0, batch)
    assert alone.lengths == together.lengths == [len(p) for p in batch]
    for row, count in enumerate(alone.lengths):
        assert torch.allclose(alone.buffer[:, :, row, :, :count], together.buffer[:, :, row, :, :count], atol=1e-10)


def test_prefill_runs_group_adjacent_rows_of_similar_length():
    calls = []

    class Recorder:
        def prefill_rows(self, first, token_ids):
            calls.append((first, [len(ids) for ids in token_ids]))

    prefill_runs(Recorder(), [(0, [1] * 10), (1, [1] * 11), (2, [1] * 12), (3, [1] * 40), (5, [1] * 41)])
    assert calls == [(0, [10, 11, 12]), (3, [40]), (5, [41])]  # 40 pads too much; row 4 is not starting


def test_batch_differences_from_batch_one_ar_are_classified_at_their_first_differing_token():
    from specdec.evals.batch_bench import differences
    from specdec.evals.methods import BenchContext
    from specdec.sampling import SamplingParams

    model = tiny_model("llama")
    context = BenchContext(model, None, SamplingParams())
    batch = prompts(3, seed=11)
    reference = [greedy_truth(model, tuple(p), 8) for p in batch]
    other = (reference[1][3] + 1) % VOCAB  # a token the target does not prefer there: a real difference
    answers = [reference[0], reference[1][:3] + [other] + reference[1][4:], reference[2][:5]]
    found = differences(context, batch, answers, reference)
    assert (found["near_ties"], found["algorithmic"]) == (0, 2)
    assert [(case["prompt"], case["position"]) for case in found["algorithmic_cases"]] == [(1, 3), (2, 5)]
    assert found["algorithmic_cases"][1]["gap"] is None  # an answer that ends early: no logit gap to measure
    # a tolerance wider than any logit gap calls the flip a near-tie; an answer that ends early stays algorithmic
    found = differences(context, batch, answers, reference, tie_tolerance=1e9)
    assert (found["near_ties"], found["algorithmic"], len(found["algorithmic_cases"])) == (1, 1, 1)
