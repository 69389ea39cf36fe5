"""`specdec bench` end to end on CPU: a tiny saved target, a handful of questions (one two-turn), the runner,
metrics, lossless check (a deliberately broken method must be caught), output files, compare, bad input, Ctrl-C."""

import copy
import json

import pytest
import torch

from specdec.cli import main as cli_main
from specdec.evals import methods as bench_methods
from specdec.evals.bench import EXIT_ALGORITHMIC, EXIT_INTERRUPTED, main as bench_main
from specdec.evals.methods import ArMethod, TurnRun
from tiny_models import fresh_tiny_model, tiny_tokenizer

QUESTIONS = [
    {"question_id": 1, "category": "alpha", "turns": ["abcdabcdabcdabcd", "abcdabcd"]},
    {"question_id": 2, "category": "alpha", "turns": ["abababababab"]},
    {"question_id": 3, "category": "beta", "turns": ["ponmlkjiponmlkji"]},
]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny random-init Llama in float32 with a real fast tokenizer, saved like any HF checkpoint."""
    path = tmp_path_factory.mktemp("target")
    model = fresh_tiny_model("llama").float()
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS))
    return path



@pytest.fixture
def extra_methods():
    """Methods the tests register: `broken` (ar's answer with one token changed) and `interrupting` (Ctrl-C on
    its second answer)."""

    class Broken(ArMethod):
        def run(self, prompt_ids, max_new_tokens):
            result = super().run(prompt_ids, max_new_tokens)
            tokens = list(result.token_ids)
            tokens[3] = (tokens[3] + 1) % 256
            return TurnRun(tokens, result.seconds, result.forwards, result.accepted_hist, result.phase_seconds)

    class Interrupting(ArMethod):
        calls = 0

        def run(self, prompt_ids, max_new_tokens):
            Interrupting.calls += 1
            if Interrupting.calls == 5:  # warm-up (2 turns), question 1 (2 turns), then Ctrl-C on question 2
                raise KeyboardInterrupt
            return super().run(prompt_ids, max_new_tokens)

    bench_methods.register_method("broken")(Broken)
    bench_methods.register_method("interrupting")(Interrupting)
    yield
    bench_methods._METHODS.pop("broken")
    bench_methods._METHODS.pop("interrupting")


def _bench(target_dir, data_file, out, *extra):
    return bench_main(["--target", str(target_dir), "--data", str(data_file), "--max-new-tokens", "12",
                       "--template", "none", "--dtype", "float32", "--out", str(out), *extra])


def test_bench_writes_results_and_stays_lossless(target_dir, data_file, tmp_path):
    code = _bench(target_dir, data_file, tmp_path, "--methods", "ar,ngram,ngram:max_n=2,min_n=1,hf,hf-static,hf-lookup",
                  "--runs", "2")
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["schema"] == "specdec.bench/1" and not payload["interrupted"]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ngram:max_n=2,min_n=1" in (tmp_path / "results.md").read_text()
    methods = ["ar", "ngram", "ngram:max_n=2,min_n=1", "hf", "hf-static", "hf-lookup"]
    # 3 questions, 4 turns, 2 runs, each method
    assert len(payload["records"]) == len(methods) * 4 * 2
    lossless = payload["lossless"]
    assert lossless["checked"] == (len(methods) - 1) * 4 * 2 and lossless["mismatches"] == []
    summary = payload["summary"]
    assert set(summary) == set(methods) and set(summary["ngram"]) == {"alpha", "beta", "overall"}
    ar, ngram = summary["ar"]["overall"], summary["ngram"]["overall"]
    assert ar["speedup"]["mean"] == pytest.approx(1.0) and ar["tau"]["mean"] == 1.0
    records = [r for r in payload["records"] if r["method"] == "ngram"]
    tokens = sum(len(r["token_ids"]) for r in records)
    forwards = sum(r["forwards"] for r in records)
    assert ngram["tau"]["mean"] == pytest.approx(tokens / forwards)
    assert summary["hf-lookup"]["overall"]["tau"]["mean"] >= 1.0
    # turn 2 of question 1 saw the method's own turn-1 answer: its prompt is longer than turn 1's
    turns = {r["turn"]: r["prompt_tokens"] for r in records if r["question_id"] == "1" and r["run"] == 0}
    assert turns[1] > turns[0]


@pytest.mark.parametrize("backend", ["static", "graph"])
def test_every_backend_runs_the_bench_losslessly(target_dir, data_file, tmp_path, backend):
    """ar and the drafters on the static and graph backends: the same answers as on the default hf backend."""
    assert _bench(target_dir, data_file, tmp_path / "hf", "--methods", "ar,ngram") == 0
    assert _bench(target_dir, data_file, tmp_path / backend, "--methods", "ar,ngram", "--backend", backend) == 0
    payloads = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("hf", backend)}
    assert payloads[backend]["config"]["backend"] == backend
    tokens = {name: {(r["method"], r["question_id"], r["turn"]): r["token_ids"] for r in payload["records"]}
              for name, payload in payloads.items()}
    assert tokens[backend] == tokens["hf"]


def test_a_broken_method_is_caught(target_dir, data_file, tmp_path, extra_methods):
    code = _bench(target_dir, data_file, tmp_path, "--methods", "ar,broken,ngram")
    assert code == EXIT_ALGORITHMIC
    payload = json.loads((tmp_path / "results.json").read_text())
    mismatches = payload["lossless"]["mismatches"]
    assert {m["method"] for m in mismatches} == {"broken"}
    assert all(m["position"] == 3 and m["kind"] == "algorithmic" for m in mismatches)
    assert len(mismatches) == 3  # one per question: turn 2 of a diverged question is not compared again
    assert "algorithmic" in (tmp_path / "results.md").read_text()


def test_interrupted_run_still_writes_what_finished(target_dir, data_file, tmp_path, extra_methods):
    code = _bench(target_dir, data_file, tmp_path, "--methods", "ar,interrupting")
    assert code == EXIT_INTERRUPTED
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["interrupted"] and payload["records"]
    assert {r["method"] for r in payload["records"]} == {"ar", "interrupting"}


def test_compare_two_runs(target_dir, data_file, tmp_path, capsys):
    for name in ("a", "b"):
        assert _bench(target_dir, data_file, tmp_path / name, "--methods", "ar,ngram", "--limit", "1") == 0
    assert cli_main(["bench", "compare", str(tmp_path / "a" / "results.json"),
                     str(tmp_path / "b" / "results.json")]) == 0
    assert "ngram" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--methods", "ar,no-such-method"], "unknown method"),
    (["--methods", "ngram"], "must include 'ar'"),
    (["--categories", "gamma"], "unknown categories"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--data", "/no/such/file.jsonl"], "does not exist"),
])
def test_bad_input_is_a_clear_error(target_dir, data_file, tmp_path, capsys, flags, message):
    argv = ["bench", "--target", str(target_dir), "--data", str(data_file), "--methods", "ar,ngram",
            "--out", str(tmp_path), *flags]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_questions_shard_over_processes(target_dir, data_file, tmp_path):
    """--num-processes 2: accelerate launches two CPU workers, each answers part of the questions, the main one
    merges them."""
    code = _bench(target_dir, data_file, tmp_path, "--methods", "ar,ngram", "--num-processes", "2")
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert sorted({r["question_id"] for r in payload["records"]}) == ["1", "2", "3"]
    assert len(payload["records"]) == 2 * 4 and payload["lossless"]["checked"] == 4


def test_bench_step_smoke(tmp_path):
    """`specdec bench-step` on the tiny shape: every (path, context, n) is timed and written (no timing asserted)."""
    paths = ("sdpa@hf", "specdec_tree@native")  # (the graph and hf tree paths run in their own tests)
    argv = ["bench-step", "--shapes", "tiny", "--paths", ",".join(paths), "--contexts", "16", "--sizes", "1,3",
            "--reps", "1", "--warmup", "1", "--kernel-contexts", "32", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    result = json.loads((tmp_path / "step_bench.json").read_text())
    chained = {(f"{p} ar-{how}8", 1) for p in paths if not p.endswith("@hf") for how in ("chain", "stream")}
    assert {(s["attn"], s["tokens"]) for s in result["steps"]} == {(p, n) for p in paths for n in (1, 3)} | chained
    assert all(s["ms"] > 0 for s in result["steps"])
    assert {(k["context"], k["tokens"]) for k in result["kernels"]["tiny"]} == {(32, 1), (32, 16), (32, 64)}


def test_spec_methods_are_timed_without_phase_syncs_and_split_from_a_synced_rerun():
    """The timed run is uninstrumented, like `ar`; on a GPU the phase split comes from a second, synchronised run,
    scaled to the first run's forwards (forced here on the CPU, where the sync itself is a no-op)."""
    from specdec import SamplingParams
    from specdec.evals.methods import BenchContext, SpecMethod

    model = fresh_tiny_model("llama").float()
    method = SpecMethod("recycling", BenchContext(model, None, SamplingParams()))
    assert not method.synced_phases  # CPU: one run
    method.synced_phases = True
    syncs, original = [], method.generator.generate

    def generate(*args, **kwargs):
        syncs.append(method.generator.phase_sync)
        out = original(*args, **kwargs)
        generate.forwards.append(out.stats.target_forwards)
        generate.seconds.append(dict(out.stats.seconds))
        return out

    generate.forwards, generate.seconds = [], []
    method.generator.generate = generate
    prompt = list(range(5, 40)) * 2
    result = method.run(prompt, 24)
    assert syncs == [False, True]
    assert result.forwards == generate.forwards[0]
    scale = generate.forwards[0] / generate.forwards[1]
    assert result.phase_seconds == pytest.approx({k: v * scale for k, v in generate.seconds[1].items()})


def test_the_synced_phase_run_does_not_teach_the_controller():
    """The synchronised run (phases split on a GPU) runs under a copy of the controller: a cost-aware controller's
    measured rates stay those of the timed run (on an H200 the syncs made goodput's speculative steps look ~0.5 ms
    dearer, and it ran plain)."""
    from specdec import SamplingParams
    from specdec.evals.methods import BenchContext, SpecMethod

    model = fresh_tiny_model("llama").float()
    method = SpecMethod("ngram@goodput:profile_reps=2", BenchContext(model, None, SamplingParams()))
    method.synced_phases = True
    controller, original, seen = method.generator.controller, method.generator.generate, []

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((method.generator.phase_sync, method.generator.controller is controller,
                     dict(controller._measured), controller.acceptance.tested.sum()))
        return out

    method.generator.generate = generate
    method.run(list(range(5, 40)) * 2, 24)
    (timed_sync, timed_own, *timed_state), (synced_sync, synced_own, *synced_state) = seen
    assert (timed_sync, synced_sync) == (False, True) and timed_own and not synced_own
    assert method.generator.controller is controller and synced_state == timed_state
    assert timed_state[0]["plain"] != (0.0, 0.0) or timed_state[0]["spec"] != (0.0, 0.0)  # it did learn


def test_ar_takes_its_chain_length_and_refuses_other_options():
    """`ar` decodes AR_CHAIN greedy tokens per host round trip on the graph backend; `ar:chain=1` one, with the same
    tokens; anything else is a clear error."""
    from specdec import SamplingParams
    from specdec.evals.methods import BenchContext, make_method
    from specdec.reference import AR_CHAIN

    context = BenchContext(fresh_tiny_model("llama").float(), None, SamplingParams(), backend="graph")
    chained, single = make_method("ar", context), make_method("ar:chain=1", context)
    assert (chained.chain, single.chain) == (AR_CHAIN, 1)
    prompt = list(range(3, 15))
    assert chained.run(prompt, 20).token_ids == single.run(prompt, 20).token_ids
    for bad in ("ar:chain=0", "ar:chain=two", "ar:depth=3"):
        with pytest.raises(ValueError, match="chain=N"):
            make_method(bad, context)


def test_a_drafter_method_may_name_its_own_controller():
    """`SPEC@CONTROLLER`: one method (its options may hold ':' and '@'), run under that controller instead of the
    run's; an '@' that names no controller stays part of the spec."""
    from specdec import SamplingParams
    from specdec.evals.bench import split_methods
    from specdec.evals.methods import BenchContext, make_method, split_controller

    listed = "ar,model:path=/d:1,mode=tree@static:max_depth=7,max_nodes=15,ngram,ngram:max_n=2@heuristic"
    assert split_methods(listed) == ["ar", "model:path=/d:1,mode=tree@static:max_depth=7,max_nodes=15", "ngram",
                                     "ngram:max_n=2@heuristic"]
    assert split_controller("ngram:max_n=2@static:max_depth=3") == ("ngram:max_n=2", "static:max_depth=3")
    assert split_controller("model:path=/a@b") == ("model:path=/a@b", None)
    context = BenchContext(fresh_tiny_model("llama").float(), None, SamplingParams(), controller="heuristic")
    own, shared = make_method("ngram@static:max_depth=3,max_nodes=3", context), make_method("ngram", context)
    assert (own.generator.controller.name, shared.generator.controller.name) == ("static", "heuristic")
    prompt = list(range(5, 20)) * 3
    assert own.run(prompt, 16).token_ids == shared.run(prompt, 16).token_ids


def test_the_near_tie_tolerance_follows_the_dtype_and_the_logits_magnitude():
    from specdec.evals.runner import near_tie_tolerance

    assert near_tie_tolerance(torch.bfloat16, 10.0) == 0.125          # the floor: an ulp at 8..16 is 0.0625
    assert near_tie_tolerance(torch.bfloat16, 30.0) == 0.25           # two ulps of 0.125 (logits in [16, 32))
    assert near_tie_tolerance(torch.bfloat16, 40.0) == 0.5            # two ulps of 0.25 (logits in [32, 64))
    assert near_tie_tolerance(torch.float32, 30.0) == 1e-4            # float32's ulp at 30 is 2e-6: the floor
    assert near_tie_tolerance(torch.bfloat16, 30.0, given=0.01) == 0.01


def test_in_bfloat16_a_wrong_token_stays_algorithmic_and_a_rounding_flip_is_a_near_tie():
    """The bf16 rule widens the tolerance to this position's own measured rounding error, never to a real error."""
    from specdec.evals.methods import TurnRun
    from specdec.evals.runner import TurnRecord, check_lossless, near_tie_tolerance

    model = fresh_tiny_model("llama", init_range=0.2).to(torch.bfloat16).eval()
    prompt = [5, 17, 3, 99, 42, 7]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    best, worst = int(logits.argmax()), int(logits.argmin())
    runner_up = int(logits.topk(2).indices[1])

    def record(method: str, token: int) -> TurnRecord:
        return TurnRecord(method, 0, "q", "c", 0, prompt, TurnRun([token], 1.0, 1))

    _, mismatches = check_lossless([record("ar", best), record("wrong", worst), record("close", runner_up)], model)
    kinds = {m.method: m for m in mismatches}
    assert kinds["wrong"].kind == "algorithmic" and kinds["wrong"].logit_gap > kinds["wrong"].tolerance
    exact = copy.deepcopy(model).float()
    with torch.no_grad():
        exact_logits = exact(torch.tensor([prompt])).logits[0, -1]
    half_gap, exact_gap = float(logits[best] - logits[runner_up]), float(exact_logits[best] - exact_logits[runner_up])
    close = kinds["close"]
    assert close.logit_gap == pytest.approx(min(abs(half_gap), abs(exact_gap)))
    scale = float(logits[[best, runner_up]].abs().max())
    assert close.tolerance == pytest.approx(max(near_tie_tolerance(torch.bfloat16, scale),
                                                2 * abs(half_gap - exact_gap)))


def test_static_budgets_in_controllers_or_the_sweep_are_the_statics_the_best_is_picked_from():
    """`--controllers goodput,static:...` without a sweep: the named static budget is compared as a static (the
    report's "best static" is it), and still listed as a controller; sweep and named statics pool."""
    from specdec.evals.controllers import compare, expand_methods

    controllers = ["goodput", "static:max_depth=8,max_nodes=16"]
    methods, groups = expand_methods(["ar", "ngram"], controllers, [], 2, lambda method: method != "ar")
    assert methods == ["ar", "ngram@goodput", "ngram@static:max_depth=8,max_nodes=16"]
    assert groups["ngram"]["static"] == ["ngram@static:max_depth=8,max_nodes=16"]

    def cell(speedup):
        return {"speedup": {"mean": speedup}}

    summary = {"ngram@goodput": {"overall": cell(1.15), "qa": cell(1.1), "rag": cell(1.2)},
               "ngram@static:max_depth=8,max_nodes=16": {"overall": cell(1.0), "qa": cell(1.1), "rag": cell(0.9)},
               "ngram@static:max_depth=2,max_nodes=4": {"overall": cell(0.9), "qa": cell(1.2), "rag": cell(0.8)}}
    entry = compare(summary, groups)["ngram"]
    assert entry["best_static"] == "ngram@static:max_depth=8,max_nodes=16" and entry["best_static_speedup"] == 1.0
    assert entry["controllers"]["goodput"]["vs_best_static"] == pytest.approx(1.15)
    _, swept = expand_methods(["ngram"], controllers, [2], 2, lambda method: True)
    assert swept["ngram"]["static"] == ["ngram@static:max_depth=8,max_nodes=16", "ngram@static:max_depth=2,max_nodes=4"]
    pooled = compare(summary, swept)["ngram"]
    assert pooled["category_best"]["qa"]["method"] == "ngram@static:max_depth=2,max_nodes=4"
    assert pooled["controllers"]["goodput"]["min_vs_category_best"] == pytest.approx(1.1 / 1.2)
