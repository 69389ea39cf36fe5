"""The benchmark's output (evals/report.py) on a payload built by hand: records written out turn by turn, the summary
computed by `specdec.evals.metrics.summarize` and checked against hand arithmetic, then the tables, results.json,
results.md, chart.png, compare and load_payload."""

import copy
import json
import statistics

import pytest
from rich.console import Console

from specdec.evals.metrics import OVERALL, summarize
from specdec.evals.report import (SCHEMA, category_table, compare, compare_markdown, load_payload, summary_table,
                                  write_results)

COMMAND = "specdec bench --methods ar,ngram,hf-lookup --runs 2 --data tiny.jsonl"
# ar's seconds per (question, turn) in run 0; every turn is 20 tokens. Run 1 is 10% slower.
AR_SECONDS = {("81", 0): 0.2, ("81", 1): 0.3, ("82", 0): 0.1, ("101", 0): 0.2, ("102", 0): 0.2}
CATEGORY = {"81": "writing", "82": "writing", "101": "coding", "102": "coding"}
TOKENS = list(range(100, 120))
# ngram: 8 forwards per 20 tokens (tau 2.5), speedup 2 in run 0 and 2.5 in run 1.
NGRAM_SPEEDUP = {0: 2.0, 1: 2.5}
NGRAM_HIST = {0: 2, 1: 2, 2: 2, 3: 2}  # 8 steps, 2·1 + 2·2 + 2·3 + 2·4 = 20 tokens


def turn_record(method, run, question_id, turn, seconds, forwards, accepted_hist, phase_seconds):
    return {"method": method, "run": run, "question_id": question_id, "category": CATEGORY[question_id],
            "turn": turn, "prompt_tokens": 30, "token_ids": TOKENS, "seconds": seconds, "forwards": forwards,
            "accepted_hist": accepted_hist, "phase_seconds": phase_seconds}


def bench_records(ngram_time_scale=1.0):
    records = []
    for run in (0, 1):
        for (question_id, turn), base in AR_SECONDS.items():
            ar = base * (1.0 if run == 0 else 1.1)
            ngram = ar / NGRAM_SPEEDUP[run] * ngram_time_scale
            records += [
                turn_record("ar", run, question_id, turn, ar, 20, {0: 20}, {"verify": ar}),
                # as JSON would give them back: string keys in accepted_hist
                turn_record("ngram", run, question_id, turn, ngram, 8, {str(k): v for k, v in NGRAM_HIST.items()},
                            {"prefill": 0.05 * ngram, "draft": 0.1 * ngram, "verify": 0.6 * ngram,
                             "accept": 0.1 * ngram}),
                turn_record("hf-lookup", run, question_id, turn, ar / 1.5, 10, {}, {}),  # a peer: no phases
            ]
    return records


def bench_payload(records, interrupted=False):
    mismatches = [
        {"method": "ngram", "run": 1, "question_id": "82", "turn": 0, "position": 5, "expected": 105, "got": 7,
         "logit_gap": 0.0123, "kind": "near-tie"},
        {"method": "hf-lookup", "run": 0, "question_id": "101", "turn": 0, "position": 3, "expected": 103,
         "got": 9, "logit_gap": 4.5, "kind": "algorithmic"},
    ]
    return {
        "schema": SCHEMA, "command": COMMAND, "created": "2026-11-22T18:40:00Z",
        "env": {"device": "cpu", "torch": "2.9.0", "transformers": "5.0.0", "triton": None, "python": "3.11.7",
                "dtype": "float32", "target": "zoo:tiny", "target_params": 81_800_000},
        "config": {"methods": "ar,ngram,hf-lookup", "data": "tiny.jsonl", "categories": None, "limit": None,
                   "max_new_tokens": 20, "runs": 2, "temperature": 0.0},
        "interrupted": interrupted,
        "records": records,
        "summary": summarize(records),
        "lossless": {"checked": 16, "mismatches": mismatches, "near_ties": 1, "algorithmic": 1},
    }


@pytest.fixture
def payload():
    return bench_payload(bench_records())


def rendered(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_summarize_matches_hand_arithmetic(payload):
    summary = payload["summary"]
    assert summary["ar"][OVERALL]["speedup"] == {"mean": 1.0, "std": 0.0}
    assert summary["ngram"][OVERALL]["tau"]["mean"] == pytest.approx(20 / 8)
    assert summary["ngram"][OVERALL]["speedup"]["mean"] == pytest.approx(2.25)
    assert summary["ngram"][OVERALL]["speedup"]["std"] == pytest.approx(statistics.stdev([2.0, 2.5]))
    # ar, writing, run 0: total 60 tokens / 0.6 s = 100; Spec-Bench mean(40 / 0.5, 20 / 0.1) = 140.
    writing = summary["ar"]["writing"]
    assert writing["tokens_per_s"]["mean"] == pytest.approx((100 + 100 / 1.1) / 2)
    assert writing["tokens_per_s_specbench"]["mean"] == pytest.approx((140 + 140 / 1.1) / 2)
    assert summary["ngram"][OVERALL]["accepted_hist"] == {k: 2 * 5 * 2 for k in NGRAM_HIST}  # 5 turns, 2 runs
    assert "S_step" in summary["ngram"][OVERALL] and "S_step" not in summary["hf-lookup"][OVERALL]
    ngram = summary["ngram"][OVERALL]  # per forward: t_other = 0.3 of the time, of which the prefill is 0.05
    assert ngram["t_prefill"]["mean"] == pytest.approx(ngram["t_other"]["mean"] / 6)


def test_summary_table_renders_every_method_and_column(payload):
    text = rendered(summary_table(payload))
    for label in ("tok/s (total)", "tok/s (Spec-Bench)", "speedup", "τ", "t_verify ms", "of which prefill", "S_step",
                  "efficiency"):
        assert label in text
    rows = {method: next(line for line in text.splitlines() if f" {method} " in line)
            for method in ("ar", "ngram", "hf-lookup")}
    assert "1.00× ± 0.00×" in rows["ar"] and "baseline" in rows["ar"]
    assert "2.25× ± 0.35×" in rows["ngram"] and "2.50" in rows["ngram"] and "1 near-tie" in rows["ngram"]
    assert "—" in rows["hf-lookup"] and "1 algorithmic" in rows["hf-lookup"]
    assert "2 runs" in text
    assert text.index(rows["ar"]) < text.index(rows["ngram"]) < text.index(rows["hf-lookup"])  # the order they ran


def test_summary_table_lossless_status_identical_and_unchecked(payload):
    payload["lossless"]["mismatches"] = []
    assert "✓ identical" in rendered(summary_table(payload))
    payload["lossless"] = None
    assert "not checked" in rendered(summary_table(payload))


def test_tables_reject_unknown_category_and_metric(payload):
    with pytest.raises(ValueError, match="categories: coding, writing, overall"):
        summary_table(payload, "math")
    with pytest.raises(ValueError, match="no method has the metric 'latency'"):
        category_table(payload, "latency")


def test_category_table_has_every_category(payload):
    text = rendered(category_table(payload, "tau"))
    assert all(name in text for name in ("coding", "writing", "overall", "ngram", "hf-lookup"))


def test_write_results_writes_json_markdown_and_png(payload, tmp_path):
    paths = write_results(payload, tmp_path / "out" / "run1")
    assert [path.name for path in paths] == ["results.json", "results.md", "chart.png"]
    results_json, results_md, chart = paths

    assert load_payload(results_json) == json.loads(json.dumps(payload))  # int hist keys become strings
    assert '"token_ids": [100, 101, 102' in results_json.read_text()  # one record per line

    png = chart.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    markdown = results_md.read_text(encoding="utf-8")
    assert COMMAND in markdown and "Interrupted" not in markdown
    assert all(f"`{method}`" in markdown for method in ("ar", "ngram", "hf-lookup"))
    assert "## Speedup by category" in markdown and "## τ by category" in markdown
    mismatch_row = next(line for line in markdown.splitlines() if line.startswith("| hf-lookup | algorithmic | 101 |"))
    assert "| 0 | 0 | 3 | 103 | 9 | 4.5 |" in mismatch_row  # run, turn, first differing position, tokens, gap
    assert "- `ngram` (80 steps): 0: 20 (25%) · 1: 20 (25%) · 2: 20 (25%) · 3: 20 (25%)" in markdown


def test_markdown_notes_an_interrupted_run(tmp_path):
    paths = write_results(bench_payload(bench_records(), interrupted=True), tmp_path)
    assert "**Interrupted:**" in paths[1].read_text(encoding="utf-8")


def test_compare_shows_relative_difference_and_one_sided_methods(payload):
    faster = bench_payload([r for r in bench_records(ngram_time_scale=0.8) if r["method"] != "hf-lookup"])
    faster["summary"]["ngram"]["math"] = copy.deepcopy(faster["summary"]["ngram"][OVERALL])
    text = rendered(compare(payload, faster))
    ngram_overall = next(line for line in text.splitlines() if " ngram " in line and " overall " in line)
    assert ngram_overall.count("+25.0%") == 2 and "+0.0%" in ngram_overall  # tok/s and speedup; τ unchanged
    assert "only in A" in text and "only in B" in text

    markdown = compare_markdown(payload, faster)
    assert "methods only in A: hf-lookup" in markdown and "categories only in B: math" in markdown
    assert "| ngram | overall |" in markdown and "+25.0%" in markdown and COMMAND in markdown


def test_load_payload_rejects_what_is_not_a_bench_result(payload, tmp_path):
    cases = {"no_schema.json": json.dumps({"summary": {}}), "wrong.json": json.dumps({**payload, "schema": "x/0"}),
             "list.json": "[1, 2]", "broken.json": "{not json"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="pass the results.json"):
            load_payload(tmp_path / name)
    with pytest.raises(ValueError, match="cannot read"):
        load_payload(tmp_path / "absent.json")


def test_paths_in_method_names_are_shown_by_their_last_part_unless_two_would_look_alike(tmp_path):
    """Tables, histogram lines and mismatches show `path=…/draft`; results.json keeps the specs whole; two methods
    whose paths share a last part keep theirs whole."""
    long_names = {"ngram": "model:path=/work/out/bench/draft,mode=tree@static:max_depth=7",
                  "hf-lookup": "model:path=/elsewhere/draft,mode=chain"}
    records = [{**record, "method": long_names.get(record["method"], record["method"])} for record in bench_records()]
    payload = bench_payload(records)
    for mismatch in payload["lossless"]["mismatches"]:
        mismatch["method"] = long_names[mismatch["method"]]
    markdown = write_results(payload, tmp_path)[1].read_text(encoding="utf-8")
    assert "| model:path=…/draft,mode=tree@static:max_depth=7 |" in markdown
    assert "| model:path=…/draft,mode=chain |" in markdown and "- `model:path=…/draft,mode=chain`: not" in markdown
    assert "/work/out/bench/draft" not in markdown.split("```")[-1]  # only in the command line above the tables
    assert long_names["ngram"] in {record["method"] for record in json.loads((tmp_path / "results.json").read_text())
                                   ["records"]}
    alike = ["model:path=/a/draft,mode=chain", "model:path=/b/draft,mode=chain"]
    payload = bench_payload([{**record, "method": alike[record["method"] == "ngram"]} if record["method"] != "ar"
                             else record for record in bench_records()])
    payload["lossless"]["mismatches"] = []
    markdown = write_results(payload, tmp_path / "alike")[1].read_text(encoding="utf-8")
    assert all(f"| {name} |" in markdown for name in alike)
