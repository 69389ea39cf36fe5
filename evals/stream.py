"""`specdec bench --stream`: prequential evaluation of drafters that learn online.

The questions run once, in a fixed order (`--data a+b` concatenates sources: a domain shift at the seam); every
method answers each question *before* any drafter learns from it (a learner only sees a generation once it is
served), methods taking turns question by question (the first one rotates). A learning drafter
(`model:path=D,online=True`, `early_exit:layer=8,online=True`) runs beside the same drafter frozen; its stream
time includes every second spent learning (inline at request boundaries, or a worker's competition for the
machine), shown apart as `learn s`.

Per window of `--window` questions and per method: tau, tokens/s, speedup over `ar` (when it runs), the drafter
version serving at the window's end; over the whole stream: tokens/s with learning included. Greedy outputs are
checked against `ar` (or, without it, against the first method).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specdec.evals.data import Question, load_questions
from specdec.evals.methods import BenchContext, SpecMethod, TurnRun, make_method
from specdec.evals.runner import BenchSettings, TurnRecord, answer, check_lossless


class StreamMethod(SpecMethod):
    """`SpecMethod` with one generation per turn (its second, synchronised run would serve the learner twice).
    `learn_s`: the learner's seconds so far (0 when frozen)."""

    version = None  # the drafter version that served the last turn

    @property
    def learner(self):
        return getattr(self.generator.drafter, "learner", None)

    @property
    def learn_s(self) -> float:
        return 0.0 if self.learner is None else self.learner.train_s

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnRun:
        params = self.context.params
        started = time.perf_counter()
        out = self.generator.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=params.temperature,
                                      top_p=params.top_p, top_k=params.top_k, seed=params.seed)
        seconds = time.perf_counter() - started  # the learner's inline updates (at reset) included
        self.version = out.stats.drafter_version
        return TurnRun(out.token_ids, seconds, out.stats.target_forwards, dict(out.stats.accepted_hist))

    def finish(self) -> float:
        """Wait for a running update (its time belongs to the stream); returns the seconds waited."""
        started = time.perf_counter()
        if self.learner is not None:
            self.learner.wait()
        return time.perf_counter() - started


def load_stream(data: str, categories, limit: int | None, field: str) -> list[Question]:
    """`a+b+...`: each source's questions in their order, one after another; `limit` (per category) applies to the
    parts that give no count of their own (`code:200` keeps its 200)."""
    questions = []
    for part in data.split("+"):
        questions += load_questions(part, categories, None if ":" in part else limit, None, field)
    if not questions:
        raise ValueError(f"--data {data!r} gave no questions")
    return questions


def run_stream(context: BenchContext, questions: list[Question], methods: list[str], max_new_tokens: int,
               template: str, window: int, show_progress: bool = True, prompt_room: int | None = None) -> dict:
    """Serve the stream with every method; returns the records, per-window rows, totals and learner reports.
    prompt_room: longer prompts keep their last tokens (the context window less the new tokens)."""
    if window < 1:
        raise ValueError(f"--window must be >= 1, got {window}")
    settings = BenchSettings(methods if "ar" in methods else ["ar", *methods], max_new_tokens, 1, 0, template,
                             prompt_room)
    runners = [make_method(spec, context) if spec.split(":")[0] == "ar" else StreamMethod(spec, context)
               for spec in methods]
    records, rows = [], []
    columns = [TextColumn("stream"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("stream", total=len(questions))
        for index, question in enumerate(questions):
            for method in runners[index % len(runners):] + runners[: index % len(runners)]:
                for turn, (prompt_ids, result) in enumerate(answer(method, context.tokenizer, question, settings)):
                    records.append(TurnRecord(method.name, 0, question.question_id, question.category, turn,
                                              prompt_ids, result))
                    rows.append({"index": index, "method": method.name, "category": question.category,
                                 "turn": turn, "new_tokens": len(result.token_ids), "forwards": result.forwards,
                                 "seconds": result.seconds, "version": getattr(method, "version", None),
                                 "learn_s": getattr(method, "learn_s", 0.0)})
            progress.advance(task)
    finish = {m.name: m.finish() for m in runners if isinstance(m, StreamMethod)}
    reference = "ar" if "ar" in methods else methods[0]
    compared, mismatches = (check_lossless(records, context.model, reference=reference)
                            if context.params.greedy else (0, []))
    return {"rows": rows, "windows": windows(rows, [m.name for m in runners], window),
            "totals": totals(rows, [m.name for m in runners], finish),
            "learners": {m.name: m.learner.report() for m in runners
                         if isinstance(m, StreamMethod) and m.learner is not None},
            "lossless": {"reference": reference, "checked": compared,
                         "mismatches": [dataclasses.asdict(m) for m in mismatches]},
            "token_ids": {f"{r.method}|{r.question_id}|{r.turn}": r.result.token_ids for r in records}}


def _aggregate(rows: list[dict]) -> dict:
    tokens, forwards = sum(r["new_tokens"] for r in rows), sum(r["forwards"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {"tau": tokens / forwards if forwards else 0.0, "tokens_per_s": tokens / seconds if seconds else 0.0,
            "tokens": tokens, "seconds": seconds}


def windows(rows: list[dict], methods: list[str], size: int) -> list[dict]:
    """Per window of `size` questions and per method: tau, tokens/s, speedup over ar, the version at its end."""
    out = []
    last = max((r["index"] for r in rows), default=-1)
    for start in range(0, last + 1, size):
        entry = {"start": start, "end": min(start + size, last + 1)}
        for method in methods:
            part = [r for r in rows if r["method"] == method and start <= r["index"] < start + size]
            entry[method] = {**_aggregate(part), "version": part[-1]["version"] if part else None,
                             "categories": sorted({r["category"] for r in part})}
        if "ar" in methods:
            for method in methods:
                ar = entry["ar"]["tokens_per_s"]
                entry[method]["speedup"] = entry[method]["tokens_per_s"] / ar if ar else 0.0
        out.append(entry)
    return out


def totals(rows: list[dict], methods: list[str], finish: dict[str, float]) -> dict:
    """The whole stream per method: tokens/s with learning included (a final wait for a running update counted)."""
    out = {}
    for method in methods:
        part = [r for r in rows if r["method"] == method]
        entry = _aggregate(part)
        entry["seconds"] += finish.get(method, 0.0)
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"] if entry["seconds"] else 0.0
        entry["learn_s"] = part[-1]["learn_s"] if part else 0.0
        out[method] = entry
    return out


def short_label(spec: str) -> str:
    """A method's spec without its online-learning options: `early_exit:layer=8 (learning)`."""
    head, _, tail = spec.partition(":")
    kept = [part for part in tail.split(",") if part and not part.startswith("online")]
    learning = any(part.replace(" ", "") == "online=True" for part in tail.split(","))
    return head + (":" + ",".join(kept) if kept else "") + (" (learning)" if learning else "")


def window_table(result: dict, metric: str = "tau") -> Table:
    methods = list(result["totals"])
    table = Table(title=f"stream: {metric} per window of questions")
    table.add_column("questions")
    for method in methods:
        table.add_column(short_label(method), justify="right")
    for entry in result["windows"]:
        cells = [f"{entry[m][metric]:.2f}" + (f" v{entry[m]['version']}" if entry[m].get("version") else "")
                 for m in methods]
        table.add_row(f"{entry['start']}-{entry['end'] - 1} ({','.join(entry[methods[0]]['categories'])})", *cells)
    table.add_row("whole stream", *[f"{result['totals'][m]['tokens_per_s']:.1f} tok/s"
                                    + (f", learn {result['totals'][m]['learn_s']:.0f} s"
                                       if result['totals'][m]['learn_s'] else "") for m in methods])
    return table


def markdown(result: dict) -> str:
    methods = list(result["totals"])
    labels = [short_label(m) for m in methods]
    lines = [f"| questions | {' | '.join(f'{m} τ' for m in labels)} | {' | '.join(f'{m} tok/s' for m in labels)} |",
             "|---" * (1 + 2 * len(methods)) + "|"]
    for entry in result["windows"]:
        lines.append(f"| {entry['start']}-{entry['end'] - 1} | "
                     + " | ".join(f"{entry[m]['tau']:.2f}" for m in methods) + " | "
                     + " | ".join(f"{entry[m]['tokens_per_s']:.1f}" for m in methods) + " |")
    lines.append("| whole stream (learning included) | " + " | ".join("" for _ in methods) + " | "
                 + " | ".join(f"{result['totals'][m]['tokens_per_s']:.1f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def write_chart(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    methods = list(result["totals"])
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
    starts = [entry["start"] for entry in result["windows"]]
    for method in methods:
        left.plot(starts, [entry[method]["tau"] for entry in result["windows"]], marker="o", label=short_label(method))
        right.plot(starts, [entry[method]["tokens_per_s"] for entry in result["windows"]], marker="o")
    left.set(title="tau per window", xlabel="question index (window start)", ylabel="tokens per target forward")
    right.set(title="tokens/s per window (learning included)", xlabel="question index (window start)")
    figure.legend(loc="lower center", ncol=min(len(methods), 2), fontsize=7)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path
