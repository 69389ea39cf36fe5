"""Online distillation (`specdec.train.online`): what a verification is turned into, that serving stays lossless while
the drafter learns and swaps weights, that it learns, one target forward per step, checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.drafters import make_drafter
from specdec.drafters.early_exit import EarlyExitDrafter
from specdec.drafters.model import ModelDrafter
from specdec.train.early_exit import ExitHead, ExitHeadConfig
from specdec.train.online import ModelStudent, OnlineConfig, OnlineLearner, bucket_loss, expected_acceptance
from tiny_models import fresh_tiny_model, greedy_truth, repetitive_prompt, single_thread

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def target_model():
    return fresh_tiny_model("llama", init_range=0.1)


def weak_draft():
    return fresh_tiny_model("llama", layers=1, seed=3, init_range=0.1).float()


def learner_for(model, **options) -> OnlineLearner:
    return OnlineLearner(ModelStudent(model), OnlineConfig(background=False, **options))


def stream(length: int, seeds: int = 6) -> list[list[int]]:
    return [repetitive_prompt(VOCAB, seed=i % seeds, length=12) for i in range(length)]


# ---- records


def test_a_verified_tree_becomes_committed_rows_and_rejected_branches():
    learner = learner_for(weak_draft(), topk=4)
    logits = torch.randn(5, VOCAB)
    # root 7; nodes 0 -> 1 accepted (then bonus 20); node 2 (a second root child) and node 3 (below node 1) rejected
    learner.record([5, 6, 7], [10, 11, 12, 13], [-1, 0, -1, 1], [0, 1], 20, logits)
    record = learner.current
    assert record.tokens == [5, 6, 7, 10, 11, 20]
    assert record.extra == [12, 13] and record.extra_position == [3, 5]
    assert [record.index(parent) for parent in record.extra_parent] == [2, 4]
    items, ids, probs, weights = record.targets()
    assert items.tolist() == [2, 3, 4, 6, 7]  # root, the two accepted nodes, the two extras
    assert weights.tolist() == [1.0, 1.0, 2.0, 2.0, 2.0]  # node 1's child was rejected: its row and after weigh more
    top = logits.softmax(-1).topk(4)
    torch.testing.assert_close(ids, top.indices) and torch.testing.assert_close(probs, top.values)
    # a plain step committed 30 after the bonus: the record continues; its extras keep their places
    learner.record([5, 6, 7, 10, 11, 20, 30], [40], [-1], [], 41, torch.randn(2, VOCAB))
    assert record.tokens == [5, 6, 7, 10, 11, 20, 30, 41] and learner.current is record
    assert record.targets()[0].tolist() == [2, 3, 4, 8, 9, 6, 10]  # 30's row, then 40 (rejected: extra 2)
    # a context that does not continue it starts a new record
    learner.record([1, 2], [], [], [], 3, torch.randn(1, VOCAB))
    assert learner.current is not record and learner.current.tokens == [1, 2, 3]


def test_the_record_forward_gives_each_item_the_logits_of_its_own_context():
    """An extra token sees its committed prefix and its tree ancestors at depth positions: its row of the one
    tree-masked forward equals a plain forward over that context (float64: rounding only)."""
    model = fresh_tiny_model("llama")
    learner = OnlineLearner(ModelStudent(model), OnlineConfig(background=False))
    learner.record([5, 6, 7], [10, 11, 12, 13], [-1, 0, -1, 2], [0], 20, torch.randn(5, VOCAB))
    learner.record([5, 6, 7, 10, 20], [14], [-1], [], 21, torch.randn(2, VOCAB))
    record = learner.current
    with torch.no_grad():
        tree_logits = learner.student.logits(record, torch.arange(len(record.tokens) + len(record.extra)), served=True)
        contexts = {record.index(-1): [5, 6, 7, 10, 11], record.index(-2): [5, 6, 7, 12],
                    record.index(-3): [5, 6, 7, 12, 13], record.index(-4): [5, 6, 7, 10, 20, 14],
                    4: [5, 6, 7, 10, 20]}
        for item, context in contexts.items():
            plain = model(torch.tensor([context])).logits[0, -1]
            torch.testing.assert_close(tree_logits[item], plain, atol=1e-9, rtol=0)


def test_losses_vanish_at_the_target_and_expected_acceptance_is_one_there():
    logits = torch.randn(3, VOCAB, dtype=torch.float64)
    top = logits.softmax(-1).topk(VOCAB)
    for loss in ("fkl", "tvd", "jsd"):
        assert bucket_loss(logits, top.indices, top.values, loss, 0.5).abs().max() < 1e-6
        assert bucket_loss(torch.zeros_like(logits), top.indices, top.values, loss, 0.5).min() > 1e-3
    torch.testing.assert_close(expected_acceptance(logits, top.indices, top.values), torch.ones(3, dtype=torch.float64))


# ---- serving while learning


def run_stream(drafter, prompts, target, length: int = 24) -> list[float]:
    generator = SpeculativeGenerator(target, drafter=drafter, controller="static:max_depth=4,max_nodes=8")
    calls = []
    target.register_forward_pre_hook(lambda *_: calls.append(1))
    taus = []
    for prompt in prompts:
        before = len(calls)
        out = generator.generate(prompt, max_new_tokens=length)
        assert len(calls) - before == 1 + out.stats.target_forwards  # prefill + one forward per step, no more
        assert out.token_ids == greedy_truth(target, tuple(prompt), length)
        assert out.stats.drafter_errors == 0
        taus.append(out.stats.tau)
    return taus


def test_greedy_output_stays_identical_to_ar_across_fifty_weight_swaps_and_tau_rises():
    target = target_model()
    drafter = ModelDrafter(weak_draft(), mode="chain", online=True, online_every=64, online_lr=3e-3,
                           online_background=False)
    taus = run_stream(drafter, stream(90), target)
    assert drafter.version >= 50 and drafter.learner.report()["updates"] >= drafter.version
    assert sum(taus[-12:]) / 12 > 1.25 * sum(taus[:12]) / 12


def test_an_early_exit_head_learns_online_from_the_target_alone():
    target = target_model()
    head = ExitHead(ExitHeadConfig.for_target(target, layer=1))
    drafter = EarlyExitDrafter(head, threshold=0.0, online=True, online_every=64, online_lr=3e-3,
                               online_background=False)
    taus = run_stream(drafter, stream(48), target)
    assert drafter.version >= 20
    assert sum(taus[-12:]) / 12 > sum(taus[:12]) / 12


def test_a_background_learner_publishes_only_between_generations():
    target = target_model()
    drafter = ModelDrafter(weak_draft(), mode="tree", topk=2, online=True, online_every=64, online_lr=3e-3,
                           online_background=True)
    generator = SpeculativeGenerator(target, drafter=drafter, controller="static:max_depth=3,max_nodes=6")
    versions = []
    for prompt in stream(24):
        out = generator.generate(prompt, max_new_tokens=20)
        assert out.token_ids == greedy_truth(target, tuple(prompt), 20)
        versions.append(out.stats.drafter_version)
        assert drafter.version == out.stats.drafter_version  # nothing was published during the generation
    drafter.learner.wait()
    assert versions == sorted(versions) and drafter.version >= 1


def test_the_gate_rolls_back_a_candidate_that_would_accept_less():
    target = target_model()
    drafter = ModelDrafter(weak_draft(), mode="chain")
    drafter.learner = OnlineLearner(ModelStudent(drafter.model),
                                    OnlineConfig(background=False, every=10**9, holdout_every=2))
    generator = SpeculativeGenerator(target, drafter=drafter, controller="static:max_depth=4,max_nodes=4")
    for prompt in stream(5):
        generator.generate(prompt, max_new_tokens=16)
    learner = drafter.learner
    assert len(learner.holdout) == 2 and learner._gate() is True  # the shadow equals the served weights
    with torch.no_grad():  # a candidate that accepts less: the gate refuses it and the shadow is restored
        for parameter in learner.student.parameters().values():
            parameter.mul_(-3.0)
    assert learner._gate() is False
    learner._roll_back()
    for name, parameter in learner.student.parameters().items():
        torch.testing.assert_close(parameter, learner.student.served_parameters()[name])


# ---- checkpoints


def test_a_checkpoint_resumes_weights_optimizer_records_and_counters(tmp_path):
    path = tmp_path / "online.safetensors"
    target = target_model()
    drafter = ModelDrafter(weak_draft(), mode="chain", online=True, online_every=64, online_lr=3e-3,
                           online_background=False, online_checkpoint=str(path))
    generator = SpeculativeGenerator(target, drafter=drafter, controller="static:max_depth=4,max_nodes=4")
    for prompt in stream(12):
        generator.generate(prompt, max_new_tokens=24)
        drafter.learner.extra["served"] = drafter.learner.extra.get("served", 0) + 1
    assert path.exists()
    saved_version = drafter.version
    resumed = ModelDrafter(weak_draft(), mode="chain", online=True, online_every=64, online_lr=3e-3,
                           online_background=False, online_checkpoint=str(path))
    learner, again = drafter.learner, resumed.learner
    assert again.version == saved_version and again.extra["served"] <= 12
    for name, parameter in learner.student.served_parameters().items():
        torch.testing.assert_close(again.student.served_parameters()[name], parameter)
    assert [r.tokens for r in again.reservoir] == [r.tokens for r in learner.reservoir]
    assert [r.row_item for r in again.holdout] == [r.row_item for r in learner.holdout]
    state, state_again = learner.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert state.keys() == state_again.keys()
    torch.testing.assert_close(state[0]["exp_avg_sq"], state_again[0]["exp_avg_sq"])
    assert again.rng.getstate() == learner.rng.getstate()
    # it goes on learning, losslessly
    run_stream(resumed, stream(8), target)


def test_bad_checkpoints_and_options_are_refused_clearly(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="not a readable online-learning checkpoint"):
        ModelDrafter(weak_draft(), online=True, online_checkpoint=str(corrupt))
    other = tmp_path / "other.safetensors"
    learner_for(fresh_tiny_model("llama", layers=2).float()).save(other)
    with pytest.raises(ValueError, match="written for another drafter"):
        ModelDrafter(weak_draft(), online=True, online_checkpoint=str(other))
    with pytest.raises(ValueError, match="drafter 'ngram' cannot learn online .*model"):
        make_drafter("ngram:online=True")
    for options, message in ((dict(online_lr=-1.0), "online_lr must be a positive"),
                             (dict(online_every=0), "online_every must be an integer >= 1"),
                             (dict(online_loss="mse"), "online_loss must be one of fkl, tvd, jsd")):
        with pytest.raises(ValueError, match=message):
            ModelDrafter(weak_draft(), online=True, **options)
    ModelDrafter(weak_draft(), online=False, online_lr=-1.0)  # options of a drafter that does not learn: unused


# ---- the command: a stream killed mid-way resumes where its checkpoint stopped


def test_specdec_train_online_resumes_after_sigkill_without_losing_or_repeating_a_prompt(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tiny_models import ALPHABET, tiny_tokenizer

    target_dir, draft_dir = tmp_path / "target", tmp_path / "draft"
    target = target_model().float()
    target.save_pretrained(target_dir)
    tiny_tokenizer().save_pretrained(target_dir)
    weak_draft().save_pretrained(draft_dir)
    prompts = ["".join(ALPHABET[t // 16] + ALPHABET[t % 16] for t in prompt) for prompt in stream(30)]
    data = tmp_path / "stream.jsonl"
    data.write_text("".join(json.dumps({"question_id": f"q{i}", "category": "letters", "turns": [text]}) + "\n"
                            for i, text in enumerate(prompts)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "specdec", "train", "online", "--target", str(target_dir), "--draft",
               str(draft_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "16", "--every", "48",
               "--lr", "3e-3", "--template", "none", "--dtype", "float32", "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, checkpoint = out / "stream.jsonl", out / "online.safetensors"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:  # kill it once a checkpoint exists and it went on
        if checkpoint.exists() and log.exists() and len(log.read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the stream finished before it could be killed: lengthen it"
    process.send_signal(signal.SIGKILL)
    process.wait()
    served_before = len(log.read_text().splitlines())
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resumed at prompt" in finished.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(30)) and served_before >= 12
    for line, prompt in zip(lines, stream(30)):  # every answer, before and after the kill, is the target's own
        assert line["token_ids"] == greedy_truth(target, tuple(prompt), 16)
    versions = [line["version"] for line in lines]
    assert versions == sorted(versions) and versions[-1] >= 3


# ---- specdec bench --stream


def test_the_prequential_stream_reports_windows_learning_time_and_the_lossless_check(tmp_path):
    from specdec.evals.data import Question
    from specdec.evals.methods import BenchContext
    from specdec.evals.stream import markdown, run_stream, write_chart
    from specdec.sampling import SamplingParams
    from tiny_models import ALPHABET, tiny_tokenizer

    target = target_model()
    draft_dir = tmp_path / "draft"
    weak_draft().save_pretrained(draft_dir)
    questions = [Question(f"q{i}", "letters" if i < 12 else "shifted",
                          ("".join(ALPHABET[t // 16] + ALPHABET[t % 16] for t in prompt),))
                 for i, prompt in enumerate(stream(12) + stream(8, seeds=3))]
    learning = f"model:path={draft_dir},mode=chain,online=True,online_every=48,online_lr=3e-3,online_background=False"
    frozen = f"model:path={draft_dir},mode=chain"
    context = BenchContext(target, tiny_tokenizer(), SamplingParams(), "static:max_depth=4,max_nodes=4")
    result = run_stream(context, questions, ["ar", learning, frozen], 16, "none", window=5, show_progress=False)
    assert [(w["start"], w["end"]) for w in result["windows"]] == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert result["windows"][-1][learning]["version"] >= 5 and result["windows"][-1][frozen]["version"] == 0
    assert result["lossless"]["checked"] == 2 * len(questions) and not result["lossless"]["mismatches"]
    assert result["totals"][learning]["learn_s"] > 0 and result["totals"][frozen]["learn_s"] == 0
    assert result["learners"][learning]["updates"] >= 5
    last = result["windows"][-1]
    assert last[learning]["tau"] > last[frozen]["tau"] and last["ar"]["speedup"] == 1.0
    assert markdown(result).count("\n") == 2 + len(result["windows"]) + 1
    assert write_chart(result, tmp_path / "stream.png").stat().st_size > 0
