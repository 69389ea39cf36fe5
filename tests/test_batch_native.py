"""Batched decoding on the native forward (`specdec.batch_native`, Triton kernels under the interpreter): its steps
equal the HF-module batched backend's, row by row, with ragged trees, idle rows and stale KV poisoned with NaN;
greedy rows through a native generator equal batch-1 plain decoding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from specdec import SpeculativeGenerator  # noqa: E402
from specdec.batch import BatchGate, BatchedStaticBackend  # noqa: E402
from specdec.batch_native import NativeBatchedBackend, batched_backend  # noqa: E402
from specdec.tree import DraftTree  # noqa: E402
from tiny_models import VOCAB, fresh_tiny_model, greedy_truth, repetitive_prompt, single_thread  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return fresh_tiny_model("llama").float()


@pytest.mark.parametrize("single_prefill", [False, True], ids=["padded-prefill", "single-sequence-prefill"])
def test_native_steps_equal_the_hf_module_backend_row_by_row(model, single_prefill):
    """(single-sequence-prefill: rows prefilled as on a GPU, through the single-sequence native backend's chunks,
    each row's KV copied in.)"""
    prompts = [repetitive_prompt(VOCAB, seed=s, length=n) for s, n in ((1, 9), (2, 17), (3, 4), (4, 12))]
    trees = [DraftTree.chain([5, 6, 7]), DraftTree.empty(), None,
             DraftTree.from_paths([[8, 9], [8, 10, 11], [12]])]
    outs = []
    with single_thread():
        for backend in (BatchedStaticBackend(model, 4, max_len=48), NativeBatchedBackend(model, 4, max_len=48)):
            if isinstance(backend, NativeBatchedBackend):
                backend.buffer.fill_(float("nan"))  # stale KV is never read
                backend.prefill_single = single_prefill
            backend.prefill_rows(0, [p[:-1] for p in prompts[:2]])
            backend.prefill_rows(2, [p[:-1] for p in prompts[2:]])
            roots = [p[-1] for p in prompts]
            roots[2] = None  # an idle row
            first, best = backend.score(roots, trees, argmax=True)
            backend.commit([[0, 1], [], None, [1, 2]])
            second = backend.score(roots, [DraftTree.chain([3]), DraftTree.chain([4, 4]), None, DraftTree.empty()])
            outs.append((first, best, second, list(backend.lengths)))
    (hf_first, hf_best, hf_second, hf_lengths), (first, best, second, lengths) = outs
    assert lengths == hf_lengths and first[2] is None and second[2] is None and best[2] is None
    for mine, theirs in zip([*first, *second], [*hf_first, *hf_second]):
        if theirs is not None:
            assert mine.shape == theirs.shape and torch.isfinite(mine).all()
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    assert best == hf_best


def test_a_native_plain_run_equals_plain_steps_one_at_a_time(model):
    """`plain_run`: 5 greedy steps with the roots fed back on the device equal 5 steps read one by one (the base
    cache's loop, on HF's modules), an idle row among them; every row's length grows by 5."""
    prompts = [repetitive_prompt(VOCAB, seed=s, length=n) for s, n in ((11, 7), (12, 15), (13, 4))]
    runs = []
    with single_thread():
        for backend in (BatchedStaticBackend(model, 3, max_len=40), NativeBatchedBackend(model, 3, max_len=40)):
            backend.prefill_rows(0, [p[:-1] for p in prompts])
            roots = [prompts[0][-1], None, prompts[2][-1]]
            runs.append((backend.plain_run(roots, 5), list(backend.lengths)))
            with pytest.raises(ValueError, match="does not fit"):
                backend.plain_run(roots, 40)
    assert runs[0] == runs[1] and runs[0][0][1] is None and runs[0][1] == [6 + 5, 14, 3 + 5]


def test_greedy_rows_through_the_native_generator_equal_batch_one(model, monkeypatch):
    """Mixed lengths, rows finishing early (different max lengths come from the queue refilling), a drafter at
    every step (the plain runs: `test_a_native_plain_run_equals_plain_steps_one_at_a_time`)."""
    monkeypatch.setattr(BatchGate, "speculate", lambda self: True)
    prompts = [repetitive_prompt(VOCAB, seed=s, length=n) for s, n in ((5, 6), (6, 21), (7, 11), (8, 3), (9, 15))]
    with single_thread():
        gen = SpeculativeGenerator(model, drafter="ngram", controller="heuristic", backend="native")
        outs = gen.generate(prompts, batch_size=3, max_new_tokens=12)
        truth = [greedy_truth(model, tuple(p), 12) for p in prompts]
    assert [o.token_ids for o in outs] == truth
    assert sum(k * n for o in outs for k, n in o.stats.accepted_hist.items()) > 0  # drafts were accepted


def test_the_generator_picks_the_native_batched_backend_only_where_it_runs(model):
    assert type(batched_backend(model, 2, native=True, max_len=32)) is NativeBatchedBackend
    assert type(batched_backend(model, 2, native=False, max_len=32)) is BatchedStaticBackend
    gpt2 = fresh_tiny_model("gpt2")
    assert type(batched_backend(gpt2, 2, native=True, max_len=32)) is BatchedStaticBackend
    with pytest.raises(ValueError, match="batch_size"):
        NativeBatchedBackend(model, 0, max_len=32)


def test_sampled_rows_run_on_the_native_batched_cache(model):
    """Temperature > 0: each row's tokens come from recursive rejection sampling on its own logits rows (the
    distribution itself is checked per row on the HF-module cache, `test_batch.py`; the rows' logits are the same)."""
    prompts = [repetitive_prompt(VOCAB, seed=s, length=n) for s, n in ((10, 5), (11, 9), (12, 7))]
    with single_thread():
        gen = SpeculativeGenerator(model, drafter="ngram", controller="heuristic", backend="native")
        outs = gen.generate(prompts, batch_size=2, max_new_tokens=6, temperature=0.8, seed=1)
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]
    assert all(0 <= token < VOCAB for o in outs for token in o.token_ids)
    assert all(o.stats.drafter_errors == 0 for o in outs)


def test_the_bench_reads_a_logit_gap_through_the_native_row_path_as_hf_does(model):
    """`native_row_gap` (what the batch bench's classifier weighs a native run's rounding by) is the same gap as a
    plain HF forward's in float32."""
    from specdec.evals.batch_bench import native_row_gap
    from specdec.evals.runner import logit_gap

    ids = repetitive_prompt(VOCAB, seed=5, length=20)
    with torch.inference_mode():
        top = model(input_ids=torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist()
    assert native_row_gap(model, ids, *top) == pytest.approx(logit_gap(model, ids, *top)[0], abs=1e-4)
