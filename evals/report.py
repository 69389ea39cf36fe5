"""The benchmark's output, made from one JSON-serialisable payload (schema `specdec.bench/1`):

- `summary_table`, `category_table`: rich tables for the terminal;
- `write_results`: results.json (the payload), results.md (tables, histograms, lossless check) and chart.png;
- `load_payload`, `compare`, `compare_markdown`: two saved runs side by side.

Every number shown comes from the payload: its summary (metric definitions in `specdec.evals.metrics`), its lossless
check and its environment. Each table is built once as a `Grid` of strings and rendered to rich or to Markdown, so
the terminal and results.md always show the same cells.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table
from rich.text import Text

from specdec.evals.metrics import OVERALL

SCHEMA = "specdec.bench/1"
BASELINE = "ar"
ABSENT = "—"  # a metric the method does not have (peers cannot be split into phases: no t_verify, S_step, ...)


@dataclass(frozen=True)
class Column:
    """One metric column: summary[method][category][metric]["mean"] * scale, written with fmt, and `± std` when
    with_std is set and the payload holds several runs."""

    header: str
    metric: str
    fmt: str = "{:.2f}"
    scale: float = 1.0
    with_std: bool = False


@dataclass(frozen=True)
class Grid:
    """A table as strings, rendered by `_rich_table` and `_markdown_table`. The first label_columns are names
    (left-aligned), the rest numbers; notes go under the table."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()
    label_columns: int = 1


SUMMARY_COLUMNS = (
    Column("tok/s (total)", "tokens_per_s", "{:.1f}", with_std=True),
    Column("tok/s (Spec-Bench)", "tokens_per_s_specbench", "{:.1f}", with_std=True),
    Column("speedup", "speedup", "{:.2f}×", with_std=True),
    Column("speedup (Spec-Bench)", "speedup_specbench", "{:.2f}×", with_std=True),
    Column("τ", "tau"),
    Column("t_verify ms", "t_verify", scale=1e3),
    Column("t_draft ms", "t_draft", scale=1e3),
    Column("t_other ms", "t_other", scale=1e3),
    Column("of which prefill", "t_prefill", scale=1e3),
    Column("S", "S"),
    Column("S_step", "S_step"),
    Column("efficiency", "efficiency", "{:.0%}"),
    Column("cost err", "cost_mape", "{:.1%}"),
    Column("ctl time", "controller_share", "{:.2%}"),
    Column("plain", "plain_share", "{:.0%}"),
)
COLUMN_BY_METRIC = {column.metric: column for column in SUMMARY_COLUMNS}
CONTROLLER_METRICS = ("cost_mape", "controller_share", "plain_share")  # shown where a method has them
COMPARED_COLUMNS = (Column("tok/s", "tokens_per_s", "{:.1f}"), Column("speedup", "speedup", "{:.2f}×"),
                    Column("τ", "tau"))
CHART_PANELS = (Column("speedup vs ar (×)", "speedup"), Column("τ (new tokens per target forward)", "tau"))
SUMMARY_NOTES = (
    "tok/s (total): all new tokens / all seconds (prefill included). "
    "tok/s (Spec-Bench): mean over questions of each question's tokens / seconds.",
    "speedup: vs ar in the same run and category. τ: new tokens per target forward. "
    "t_verify / t_draft / t_other: milliseconds per target forward; t_other holds the prompt's prefill, shown apart.",
    "S = τ·t_AR / t_step; S_step = τ·t_AR / (t_verify + t_draft); efficiency = S / S_step. "
    f"{ABSENT}: not measured (peers cannot be split into phases). Paths in method names: their last part (…/name).",
)


# ---------------------------------------------------------------------------------------------------- reading


def load_payload(path: str | Path) -> dict:
    """A payload saved by `write_results` (results.json), checked to be a `specdec.bench/1` result."""
    path = Path(path)
    hint = "pass the results.json that `specdec bench` wrote"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error}; {hint}") from error
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not JSON ({error}); {hint}") from error
    schema = payload.get("schema") if isinstance(payload, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path} is not a specdec bench result: its schema is {schema!r}, expected {SCHEMA!r}; "
                         f"{hint}")
    if not isinstance(payload.get("summary"), dict):
        raise ValueError(f"{path} has schema {SCHEMA!r} but no summary; it was cut short: run the bench again")
    return payload


def _methods(*payloads: dict) -> list[str]:
    """Methods of the summaries: ar first, then in the order they ran (their records' order), then any others."""
    order = [BASELINE]
    for payload in payloads:
        order += [*(record["method"] for record in payload.get("records", [])), *sorted(payload["summary"])]
    present = {method for payload in payloads for method in payload["summary"]}
    return [method for method in dict.fromkeys(order) if method in present]


_DIRECTORY = re.compile(r"(?<==)/[^,@]*/(?=[^/,@]+)")  # "path=/work/out/draft" -> "path=…/draft"


def _labels(methods: list[str]) -> dict[str, str]:
    """How each method is shown: option values that are absolute paths cut to their last part, unless that makes two
    methods look alike (results.json and the command line keep them whole)."""
    short = {method: _DIRECTORY.sub("…/", method) for method in methods}
    clashes = Counter(short.values())
    return {method: label if clashes[label] == 1 else method for method, label in short.items()}


def _categories(*payloads: dict) -> list[str]:
    """Categories of the summaries, sorted, then "overall"."""
    found = {category for payload in payloads for entries in payload["summary"].values() for category in entries}
    return sorted(found - {OVERALL}) + ([OVERALL] if OVERALL in found else [])


def _entry(payload: dict, method: str, category: str) -> dict | None:
    return payload["summary"].get(method, {}).get(category)


def _run_count(payload: dict) -> int:
    """Runs that produced records (fewer than asked when interrupted); the config's runs if no records were kept."""
    runs = {record["run"] for record in payload.get("records", [])}
    return len(runs) or payload.get("config", {}).get("runs", 1)


def _cell(entry: dict | None, column: Column, runs: int) -> str:
    stat = (entry or {}).get(column.metric)
    if stat is None:
        return ABSENT
    text = column.fmt.format(stat["mean"] * column.scale)
    if column.with_std and runs > 1:
        text += " ± " + column.fmt.format(stat["std"] * column.scale)
    return text


def _target_line(payload: dict) -> str:
    env = payload.get("env", {})
    return f"{env.get('target', 'unknown target')} on {env.get('device', 'unknown device')}"


def _mismatches(payload: dict) -> list[dict]:
    return (payload.get("lossless") or {}).get("mismatches", [])


def _lossless_status(payload: dict, method: str) -> str:
    """✓ identical, or the count of each kind of mismatch with ar (near-tie flips, algorithmic)."""
    if method == BASELINE:
        return "baseline"
    if not (payload.get("lossless") or {}).get("checked"):
        return "not checked"
    kinds = Counter(mismatch["kind"] for mismatch in _mismatches(payload) if mismatch["method"] == method)
    if not kinds:
        return "✓ identical"
    mark = "✗" if kinds["algorithmic"] else "≈"
    return mark + " " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))


# ---------------------------------------------------------------------------------------------------- grids


def _summary_grid(payload: dict, category: str) -> Grid:
    if category not in _categories(payload):
        raise ValueError(f"no category {category!r} in this payload; its categories: "
                         f"{', '.join(_categories(payload))}")
    runs = _run_count(payload)
    labels = _labels(_methods(payload))
    present = {name for entries in payload["summary"].values() for name in entries.get(category, {})}
    columns = [c for c in SUMMARY_COLUMNS if c.metric not in CONTROLLER_METRICS or c.metric in present]
    rows = tuple((label, *(_cell(_entry(payload, method, category), column, runs) for column in columns),
                  _lossless_status(payload, method)) for method, label in labels.items())
    notes = SUMMARY_NOTES + ((f"mean ± std over {runs} runs.",) if runs > 1 else ())
    if len(columns) > len(SUMMARY_COLUMNS) - len(CONTROLLER_METRICS):
        notes += ("cost err: the cost model's mean absolute error on its predicted step times; ctl time: the "
                  "controller's own share of the wall time; plain: the share of tokens made by plain runs.",)
    return Grid(f"{category} · {_target_line(payload)}", ("method", *(c.header for c in columns), "lossless"),
                rows, notes)


def _category_grid(payload: dict, metric: str) -> Grid:
    found = {name for entries in payload["summary"].values() for entry in entries.values() for name in entry}
    if metric not in found:
        raise ValueError(f"no method has the metric {metric!r}; metrics in this payload: {', '.join(sorted(found))}")
    column = COLUMN_BY_METRIC.get(metric, Column(metric, metric))
    runs, categories = _run_count(payload), _categories(payload)
    rows = tuple((label, *(_cell(_entry(payload, method, category), column, runs) for category in categories))
                 for method, label in _labels(_methods(payload)).items())
    return Grid(f"{column.header} by category · {_target_line(payload)}", ("method", *categories), rows)


def _relative_change(entry_a: dict | None, entry_b: dict | None, metric: str) -> str:
    """B/A − 1 as a signed percentage; which side is missing when only one has the method and category."""
    if entry_a is None or entry_b is None:
        return "only in B" if entry_a is None else "only in A"
    if metric not in entry_a or metric not in entry_b or not entry_a[metric]["mean"]:
        return ABSENT
    return f"{entry_b[metric]['mean'] / entry_a[metric]['mean'] - 1:+.1%}"


def _compare_row(a: dict, b: dict, method: str, label: str, category: str) -> tuple[str, ...]:
    entry_a, entry_b = _entry(a, method, category), _entry(b, method, category)
    cells = []
    for column in COMPARED_COLUMNS:
        cells += [_cell(entry_a, column, 1), _cell(entry_b, column, 1),
                  _relative_change(entry_a, entry_b, column.metric)]
    return (label, category, *cells)


def _only_in_one(kind: str, names_a: set[str], names_b: set[str]) -> tuple[str, ...]:
    return tuple(f"{kind} only in {side}: {', '.join(sorted(names))}"
                 for side, names in (("A", names_a - names_b), ("B", names_b - names_a)) if names)


def _compare_grid(a: dict, b: dict) -> Grid:
    rows = tuple(_compare_row(a, b, method, label, category) for method, label in _labels(_methods(a, b)).items()
                 for category in _categories(a, b)
                 if _entry(a, method, category) is not None or _entry(b, method, category) is not None)
    headers = ("method", "category", *(f"{c.header} {side}" for c in COMPARED_COLUMNS for side in ("A", "B", "Δ")))
    notes = ("Δ = B/A − 1.", *_only_in_one("methods", set(_methods(a)), set(_methods(b))),
             *_only_in_one("categories", set(_categories(a)), set(_categories(b))))
    return Grid(f"A: {_target_line(a)}  vs  B: {_target_line(b)}", headers, rows, notes, label_columns=2)


def _mismatch_grid(payload: dict) -> Grid:
    headers = ("method", "kind", "question", "run", "turn", "first differing position", "expected", "got",
               "logit gap")
    labels = _labels(_methods(payload))
    rows = tuple((labels.get(m["method"], m["method"]), m["kind"], str(m["question_id"]), str(m["run"]),
                  str(m["turn"]), str(m["position"]), str(m["expected"]), str(m["got"]),
                  ABSENT if m["logit_gap"] is None else f"{m['logit_gap']:.3g}") for m in _mismatches(payload))
    return Grid("mismatches", headers, rows, label_columns=3)


# ---------------------------------------------------------------------------------------------------- rendering


def _controllers_grid(payload: dict) -> Grid:
    from specdec.evals.controllers import comparison_rows

    notes = ("vs best static: speedup / the mixed workload's best static speedup; worst category: the lowest, over "
             "categories, of speedup / that category's own best static speedup (picked on the timed questions); "
             "worst cat. speedup: the lowest category speedup over ar.",)
    return Grid(f"controllers vs static budgets · {_target_line(payload)}",
                ("drafter", "controller", "speedup", "vs best static", "worst category", "worst cat. speedup"),
                tuple(comparison_rows(payload["controllers"])), notes, label_columns=2)


def controllers_table(payload: dict) -> Table:
    return _rich_table(_controllers_grid(payload))


def _rich_table(grid: Grid) -> Table:
    table = Table(title=Text(grid.title), caption=Text("\n".join(grid.notes)) if grid.notes else None,
                  caption_justify="left")
    for index, header in enumerate(grid.headers):
        table.add_column(Text(header), justify="left" if index < grid.label_columns else "right")
    for row in grid.rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _markdown_table(grid: Grid) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    align = tuple(":--" if index < grid.label_columns else "--:" for index in range(len(grid.headers)))
    notes = "\n\n".join(f"*{note}*" for note in grid.notes)
    return "\n".join([line(grid.headers), line(align), *map(line, grid.rows)]) + ("\n\n" + notes if notes else "")


def summary_table(payload: dict, category: str = OVERALL) -> Table:
    """One row per method: both tokens/s, speedups, τ, per-step phase times, speed of light, lossless status."""
    return _rich_table(_summary_grid(payload, category))


def category_table(payload: dict, metric: str = "speedup") -> Table:
    """Methods × categories (then overall) of one summary metric."""
    return _rich_table(_category_grid(payload, metric))


def compare(a: dict, b: dict) -> Table:
    """Two payloads, per method × category: tokens/s, speedup and τ of A and B, and B/A − 1."""
    return _rich_table(_compare_grid(a, b))


def compare_markdown(a: dict, b: dict) -> str:
    """`compare` as Markdown, headed by what each side ran."""
    sides = [f"- **{side}**: `{p.get('command', '?')}` ({p.get('created', '?')}; {_target_line(p)})"
             for side, p in (("A", a), ("B", b))]
    return "\n\n".join(["# specdec bench: A vs B", "\n".join(sides), _markdown_table(_compare_grid(a, b))]) + "\n"


# ---------------------------------------------------------------------------------------------------- results.md


def _environment_line(payload: dict) -> str:
    env = payload.get("env", {})
    labelled = (("device", "{}"), ("torch", "torch {}"), ("transformers", "transformers {}"),
                ("triton", "triton {}"), ("python", "Python {}"), ("dtype", "{}"), ("target", "target {}"))
    parts = [template.format(env[key]) for key, template in labelled if env.get(key) is not None]
    if env.get("target_params"):
        parts.append(f"{env['target_params'] / 1e6:,.1f}M parameters")
    if env.get("linear") not in (None, "aten"):
        parts.append(f"{env['linear']} linear kernel")
    if payload.get("created"):
        parts.append(f"run {payload['created']}")
    return "**Environment:** " + " · ".join(parts)


def _settings_line(payload: dict) -> str:
    def text(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    settings = [f"{key}={text(value)}" for key, value in payload.get("config", {}).items()]
    return "**Settings:** " + " · ".join(f"`{setting}`" for setting in settings) if settings else ""


def _histogram_line(payload: dict, method: str, label: str) -> str:
    hist = {int(k): v for k, v in (_entry(payload, method, OVERALL) or {}).get("accepted_hist", {}).items()}
    total = sum(hist.values())
    if not total:
        return f"- `{label}`: not recorded"
    buckets = " · ".join(f"{accepted}: {count} ({count / total:.0%})" for accepted, count in sorted(hist.items()))
    return f"- `{label}` ({total} steps): {buckets}"


def _histogram_section(payload: dict) -> str:
    lines = [_histogram_line(payload, method, label) for method, label in _labels(_methods(payload)).items()]
    return ("## Accepted draft length\n\nTarget forwards by number of drafted tokens accepted (0: the target's own "
            "token only), all runs, all categories.\n\n" + "\n".join(lines))


def _lossless_section(payload: dict) -> str:
    lossless = payload.get("lossless")
    if not lossless:
        return "## Lossless check\n\nNot checked in this run."
    mismatches = _mismatches(payload)
    head = f"{lossless.get('checked', 0)} turns compared token by token with `ar` (same run, question and turn): "
    if not mismatches:
        return f"## Lossless check\n\n{head}all identical ✓."
    kinds = Counter(mismatch["kind"] for mismatch in mismatches)
    head += f"{len(mismatches)} differ ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))})."
    legend = ("near-tie: the target's two competing logits at the first differing position are within the tie "
              "tolerance (a rounding flip between one-token and many-token forwards); algorithmic: anything else, "
              "a bug to find. Later turns of a question that differed are not compared.")
    return "\n\n".join(["## Lossless check", head, legend, _markdown_table(_mismatch_grid(payload))])


def markdown_report(payload: dict) -> str:
    """The text of results.md."""
    interrupted = ("> **Interrupted:** the run was stopped before it finished; the numbers cover only the turns "
                   "that completed." if payload.get("interrupted") else "")
    sections = [f"# specdec bench · {_target_line(payload)}", interrupted,
                f"```sh\n{payload.get('command', '')}\n```", _environment_line(payload), _settings_line(payload),
                "## Overall\n\n" + _markdown_table(_summary_grid(payload, OVERALL)),
                "## Speedup by category\n\n" + _markdown_table(_category_grid(payload, "speedup")),
                "## τ by category\n\n" + _markdown_table(_category_grid(payload, "tau")),
                _histogram_section(payload), _lossless_section(payload)]
    if payload.get("controllers"):
        sections.insert(6, "## Controllers against static budgets\n\n" + _markdown_table(_controllers_grid(payload)))
    return "\n\n".join(section for section in sections if section) + "\n"


def write_markdown(payload: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown_report(payload), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- chart.png


def _bar_panel(axes, payload: dict, panel: Column, methods: list[str], categories: list[str]) -> None:
    """Grouped bars: one group per category, one bar per method; std error bars when there are several runs."""
    width, runs, labels = 0.8 / len(methods), _run_count(payload), _labels(methods)
    for index, method in enumerate(methods):
        stats = [(_entry(payload, method, category) or {}).get(panel.metric) for category in categories]
        heights = [stat["mean"] if stat else math.nan for stat in stats]
        errors = [stat["std"] if stat else 0.0 for stat in stats] if runs > 1 else None
        offsets = [position - 0.4 + width * (index + 0.5) for position in range(len(categories))]
        axes.bar(offsets, heights, width, yerr=errors, capsize=2, label=labels[method])
    axes.set_xticks(range(len(categories)), categories)
    axes.set_ylabel(panel.header)
    axes.grid(axis="y", alpha=0.3)


def write_chart(payload: dict, path: str | Path) -> Path:
    """chart.png: speedup and τ per category (and overall), grouped by method. Drawn on an Agg canvas of its own
    (no pyplot), so no global figure is left open."""
    methods, categories = _methods(payload), _categories(payload)
    figure = Figure(figsize=(min(20.0, max(8.0, 0.3 * len(categories) * (len(methods) + 1))), 8), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(len(CHART_PANELS), 1, sharex=True)
    for axes, panel in zip(panels, CHART_PANELS):
        _bar_panel(axes, payload, panel, methods, categories)
    panels[-1].set_xlabel("category")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, title="method", loc="outside lower center", ncols=min(len(methods), 6))
    figure.suptitle(f"specdec bench · {_target_line(payload)}")
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------- results


def payload_json(payload: dict) -> str:
    """The payload as JSON: indent 1, with the records last and one per line (token ids one per line would bury
    the summary)."""
    if "records" not in payload or len(payload) == 1:
        return json.dumps(payload, indent=1, ensure_ascii=False) + "\n"
    head = json.dumps({key: value for key, value in payload.items() if key != "records"}, indent=1,
                      ensure_ascii=False)
    records = ",\n  ".join(json.dumps(record, ensure_ascii=False) for record in payload["records"])
    body = f'"records": [\n  {records}\n ]' if records else '"records": []'
    return f"{head[:-2]},\n {body}\n}}\n"


def write_results(payload: dict, out_dir: str | Path) -> list[Path]:
    """results.json, results.md and chart.png in out_dir (created if needed); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(payload_json(payload), encoding="utf-8")
    return [json_path, write_markdown(payload, out_dir / "results.md"), write_chart(payload, out_dir / "chart.png")]
