"""Benchmark metrics, per method x category (and "overall"), as mean and std over runs.

Definitions (per run, over the turns of the category):
- tokens_per_s:          total new tokens / total wall seconds (prefill included)
- tokens_per_s_specbench: Spec-Bench's mean over questions of (question's tokens / question's seconds)
- speedup, speedup_specbench: the same ratio of the method to `ar` (same run, same category)
- tau:                   new tokens / target forwards (forwards that produced tokens; the bonus included)
- t_step, t_verify, t_draft, t_other: seconds per target forward (t_other = t_step - t_verify - t_draft: acceptance,
                         commit, observe, prefill, Python); t_prefill: the prefill's share of t_other (the prompt's
                         forward, once per turn, spread over the turn's forwards)
- speed of light (DESIGN §7), with t_AR = ar's seconds per token:
  S = tau * t_AR / t_step (the measured speedup in per-step terms); S_step = tau * t_AR / (t_verify + t_draft)
  (what the step alone would allow); efficiency = S / S_step. Peers (HF) cannot be split into phases: no S_step.
- cost-aware controllers: cost_mape (the cost model's mean absolute percentage error on the predicted step times,
  over its steps), controller_share (the controller's own seconds / wall seconds), plain_share (tokens made by
  plain runs, budget 0)
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Iterable

OVERALL = "overall"


def _per_run(records: list[dict]) -> dict[str, float]:
    tokens = sum(len(r["token_ids"]) for r in records)
    seconds = sum(r["seconds"] for r in records)
    forwards = sum(r["forwards"] for r in records)
    by_question: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_question[record["question_id"]].append(record)
    per_question = [sum(len(r["token_ids"]) for r in rs) / max(sum(r["seconds"] for r in rs), 1e-12)
                    for rs in by_question.values()]
    phases = Counter()
    for record in records:
        phases.update(record["phase_seconds"])
    metrics = {"tokens": tokens, "seconds": seconds, "forwards": forwards,
               "tokens_per_s": tokens / seconds if seconds else 0.0,
               "tokens_per_s_specbench": statistics.fmean(per_question) if per_question else 0.0,
               "tau": tokens / forwards if forwards else 0.0,
               "t_step": seconds / forwards if forwards else 0.0}
    controller = Counter()
    for record in records:
        report = record.get("controller") or {}
        controller["controller_s"] += report.get("controller_s", 0.0)
        controller["cost_steps"] += report.get("cost_steps", 0)
        controller["cost_error"] += report.get("cost_mape", 0.0) * report.get("cost_steps", 0)
        controller["plain_tokens"] += report.get("plain_tokens", 0)
    if controller["cost_steps"]:
        metrics["cost_mape"] = controller["cost_error"] / controller["cost_steps"]
        metrics["controller_share"] = controller["controller_s"] / seconds if seconds else 0.0
        metrics["plain_share"] = controller["plain_tokens"] / tokens if tokens else 0.0
    if phases and forwards:
        metrics["t_verify"] = phases.get("verify", 0.0) / forwards
        metrics["t_draft"] = phases.get("draft", 0.0) / forwards
        metrics["t_other"] = metrics["t_step"] - metrics["t_verify"] - metrics["t_draft"]
        metrics["t_prefill"] = phases.get("prefill", 0.0) / forwards
    return metrics


def _with_ratios(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    out = dict(metrics)
    out["speedup"] = metrics["tokens_per_s"] / baseline["tokens_per_s"] if baseline["tokens_per_s"] else 0.0
    out["speedup_specbench"] = (metrics["tokens_per_s_specbench"] / baseline["tokens_per_s_specbench"]
                                if baseline["tokens_per_s_specbench"] else 0.0)
    t_ar = baseline["seconds"] / baseline["tokens"] if baseline["tokens"] else 0.0
    if metrics["t_step"]:
        out["S"] = metrics["tau"] * t_ar / metrics["t_step"]
    step = metrics.get("t_verify", 0.0) + metrics.get("t_draft", 0.0)
    if "t_verify" in metrics and step:
        out["S_step"] = metrics["tau"] * t_ar / step
        out["efficiency"] = out["S"] / out["S_step"]
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(records: Iterable[dict]) -> dict[str, dict[str, dict]]:
    """records (TurnRecord.as_dict()) -> {method: {category | "overall": {metric: {mean, std}, "accepted_hist"}}}."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for record in records:
        for category in (record["category"], OVERALL):
            groups[(record["method"], category, record["run"])].append(record)
    per_run = {key: _per_run(rs) for key, rs in groups.items()}
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for method, category in sorted({(m, c) for m, c, _ in per_run}):
        runs = sorted(r for m, c, r in per_run if (m, c) == (method, category))
        rows = [_with_ratios(per_run[(method, category, r)], per_run[("ar", category, r)])
                for r in runs if ("ar", category, r) in per_run]
        if not rows:
            continue
        entry = {name: _mean_std([row[name] for row in rows]) for name in rows[0] if all(name in r for r in rows)}
        hist = Counter()
        for record in (rec for r in runs for rec in groups[(method, category, r)]):
            hist.update({int(k): v for k, v in record["accepted_hist"].items()})
        entry["accepted_hist"] = dict(sorted(hist.items()))
        summary[method][category] = entry
    return dict(summary)
