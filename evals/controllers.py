"""Controllers against static budgets in one `specdec bench` run.

`--controllers goodput,heuristic,...` crosses every drafter method (without a controller of its own) with each
controller: `ngram` becomes `ngram@goodput`, `ngram@heuristic`, ... `--static-sweep 2,4,8` adds, per drafter, the
static budgets `DRAFTER@static:max_depth=D,max_nodes=W*D` (W = `--static-width`). The best static budget is the
sweep's fastest: for the mixed workload the one picked on a dev split (`--dev-limit N`: N more questions per
category, run before the timed ones with `ar` and the sweep only), else the one fastest overall on the timed
questions themselves (an oracle: it favours the static side); per category, the fastest on that category's timed
questions (again an oracle). `compare` reports each controller's speedup and its ratio to both."""

from __future__ import annotations

from specdec.drafters.base import parse_spec
from specdec.evals.methods import split_controller
from specdec.evals.metrics import OVERALL


def static_spec(depth: int, width: int) -> str:
    return f"static:max_depth={depth},max_nodes={depth * width}"


def expand_methods(methods: list[str], controllers: list[str], sweep: list[int], width: int,
                   is_drafter) -> tuple[list[str], dict[str, dict]]:
    """(the methods to run, {drafter: {"static": [methods], "controllers": {controller: method}}})."""
    if any(depth < 1 for depth in sweep) or width < 1:
        raise ValueError(f"--static-sweep depths and --static-width must be >= 1, got {sweep} and {width}")
    out, groups = [], {}
    for method in methods:
        drafter, own = split_controller(method)
        if own is not None or not is_drafter(method) or not (controllers or sweep):
            out.append(method)
            continue
        group = groups.setdefault(drafter, {"static": [], "controllers": {}})
        for controller in controllers:
            group["controllers"][controller] = f"{drafter}@{controller}"
            out.append(group["controllers"][controller])
            if parse_spec(controller)[0] == "static":  # a static budget named in --controllers is one of the
                group["static"].append(out[-1])  # statics the best is picked from, as the sweep's are
        for depth in sweep:
            group["static"].append(f"{drafter}@{static_spec(depth, width)}")
            out.append(group["static"][-1])
    if len(set(out)) != len(out):
        raise ValueError("a method appears twice after crossing with --controllers / --static-sweep")
    return out, groups


def best_static(summary: dict, statics: list[str], category: str = OVERALL) -> str | None:
    """The static method with the highest speedup in `category`."""
    scored = [(summary[m][category]["speedup"]["mean"], m) for m in statics if category in summary.get(m, {})]
    return max(scored)[1] if scored else None


def compare(summary: dict, groups: dict[str, dict], dev_best: dict[str, str] | None = None) -> dict[str, dict]:
    """Per drafter: the best static budgets and each controller's speedup, overall and per category, with ratios."""
    out = {}
    for drafter, group in groups.items():
        statics = group["static"]
        mixed = (dev_best or {}).get(drafter) or best_static(summary, statics)
        categories = sorted({c for m in statics for c in summary.get(m, {}) if c != OVERALL})
        entry = {"best_static": mixed, "picked_on": "dev split" if dev_best and drafter in dev_best else "timed set",
                 "best_static_speedup": _speedup(summary, mixed, OVERALL), "controllers": {}}
        per_category = {c: best_static(summary, statics, c) for c in categories}
        entry["category_best"] = {c: {"method": m, "speedup": _speedup(summary, m, c)} for c, m in per_category.items()}
        for controller, method in group["controllers"].items():
            speedup = _speedup(summary, method, OVERALL)
            rows = {c: _ratio(_speedup(summary, method, c), entry["category_best"][c]["speedup"])
                    for c in categories}
            entry["controllers"][controller] = {
                "method": method, "speedup": speedup,
                "vs_best_static": _ratio(speedup, entry["best_static_speedup"]),
                "vs_category_best": rows, "min_vs_category_best": min(rows.values(), default=None),
                "min_category_speedup": min((_speedup(summary, method, c) or 0.0 for c in categories), default=None)}
        out[drafter] = entry
    return out


def _speedup(summary: dict, method: str | None, category: str) -> float | None:
    entry = summary.get(method or "", {}).get(category)
    return entry["speedup"]["mean"] if entry else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def comparison_rows(comparison: dict) -> list[tuple[str, ...]]:
    """Rows for the report: drafter, controller, speedup, vs the mixed best static, worst category ratio, worst
    category speedup."""
    rows = []
    for drafter, entry in comparison.items():
        static = entry["best_static"] or "-"
        rows.append((drafter, f"best static ({entry['picked_on']}): {static.partition('@')[2]}",
                     _fmt(entry["best_static_speedup"], "{:.2f}×"), "1.00", "-", "-"))
        for controller, row in entry["controllers"].items():
            rows.append((drafter, controller, _fmt(row["speedup"], "{:.2f}×"), _fmt(row["vs_best_static"]),
                         _fmt(row["min_vs_category_best"]), _fmt(row["min_category_speedup"], "{:.2f}×")))
    return rows


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "—" if value is None else pattern.format(value)
