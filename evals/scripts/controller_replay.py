"""Replay draft-budget policies on a bench run's real answers with a device's measured costs: no model, no device.

Greedy answers are fixed by the target, so what a model-free drafter would propose at each position, and how much of
it the target would accept, follows from the text alone. This script rebuilds each `ar` answer's prompt (turn 0),
walks the answer as a policy would (a plain run of k tokens, or a speculative step whose tree `ngram` proposes from
the committed text; accepted = the longest tree path equal to the answer's next tokens), and charges each decision
what the run measured on its device:
    plain run of k   one plain step (verify_s(0)) + k - 1 chained tokens, so that a run of 8 costs `ar`'s 8 tokens
    speculative step the profiled verify_s(nodes) of the run's cost cache + the drafter's seconds per step + the
                     rest of a step (the static method's t_draft and t_other less the prefill, per step)
Policies: `ar`, `static` (depth 8, 16 nodes: the bench's sweep), `oracle` (static's proposals, each verified only
where it pays, the answer known, else a plain step: the most a gate could make of this drafter), `goodput` (the real
controller, its cost model built from the same profile: it sees the step times the replay charges; its own host
time, measured here, is charged too). Prints tokens/s and speedup over `ar` per category and overall; NOISE=0.05
jitters each charged time by +-5% (seeded); VERBOSE=1 prints goodput's counters. Not charged: the loop's other host
work, and what a real step costs beyond the profile (on the H100 run g_paid2 the replay said 1.05x for goodput, the
run gave 0.88x): it ranks policies, it does not predict a run.

    python3 evals/scripts/controller_replay.py RESULTS.json COSTS.json [STATIC_METHOD]
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import defaultdict

from specdec.controllers import Budget, StepStats
from specdec.controllers.adaptive import GoodputController
from specdec.controllers.cost import CostModel
from specdec.drafters.base import DraftContext
from specdec.drafters.ngram import NgramDrafter
from specdec.evals.data import load_questions
from specdec.evals.runner import BenchSettings, first_turn_ids
from specdec.models import load_model
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree, max_depth

NOISE = float(os.environ.get("NOISE", 0.0))


def accepted_path(tree: DraftTree, answer: list[int], at: int) -> tuple[int, ...]:
    """The nodes of the longest root-to-node path of `tree` whose tokens equal answer[at:] (greedy acceptance:
    the first matching child at each depth)."""
    if not len(tree):
        return ()
    parents, tokens = tree.host_parents, tree.host_tokens or tree.tokens.tolist()
    path: list[int] = []
    for node, (parent, token) in enumerate(zip(parents, tokens)):
        depth = len(path) + 1
        if parent == (path[-1] if path else -1) and at + depth - 1 < len(answer) and answer[at + depth - 1] == token:
            path.append(node)
    return tuple(path)


class Charges:
    def __init__(self, results: dict, profile: dict, static: str):
        summary = results["summary"]
        overall = summary["ar"].get("overall") or next(iter(summary["ar"].values()))
        self.plain = overall["t_step"]["mean"]
        stat = summary[static].get("overall") or next(iter(summary[static].values()))
        self.draft = stat["t_draft"]["mean"]  # per target forward: a speculative step is one
        self.other = max(stat["t_other"]["mean"] - stat["t_prefill"]["mean"], 0.0)
        self.points = {int(n): s for n, s in profile["points"].items()}
        self.cost = CostModel(self.points, stepwise=True)
        self.rng = random.Random(0)

    def plain_run(self, steps: int) -> float:
        """A chained plain run of `steps`: its first step costs a single plain step (verify_s(0): one host round trip
        each run), the others `ar`'s chained token less that step's share of its runs of 8."""
        first = self.points[0]
        chained = max((8 * self.plain - first) / 7, 0.0)
        return first + (steps - 1) * chained

    def jitter(self, seconds: float) -> float:
        return seconds * (1.0 + self.rng.uniform(-NOISE, NOISE)) if NOISE else seconds


def replay(policy: str, cases: list, charges: Charges) -> dict:
    controller = None
    if policy == "goodput":
        controller = GoodputController()
        controller.cost, controller._backend = CostModel(dict(charges.points), stepwise=True), object()
        controller.cost.seed_plain({8: 8 * charges.plain})
    per_category = defaultdict(lambda: [0, 0.0])
    drafter = NgramDrafter()
    for category, prompt, answer in cases:
        drafter.reset()
        if controller is not None:
            controller._unmeasured = True  # as `prepare` leaves it for a new sequence
        position, seconds = 0, 0.0
        charged = controller._counters["controller_s"] if controller is not None else 0.0
        while position < len(answer):
            if policy == "ar":
                budget = Budget(0, 0, plain_steps=8)
            elif policy in ("static", "oracle"):
                budget = Budget(16, 8)
            else:
                budget = controller.budget([])
            if controller is not None:  # the controller's own host time so far, charged as the loop pays it
                spent = controller._counters["controller_s"]
                seconds += spent - charged
                charged = spent
            left = len(answer) - position
            if budget.max_nodes == 0:
                steps = min(budget.plain_steps, left)
                run_s = charges.jitter(charges.plain_run(steps))
                seconds += run_s
                position += steps
                if controller is not None:
                    controller.observe(StepStats(0, 0, 0, verify_s=run_s, step_s=run_s, plain_steps=steps))
                continue
            depth = min(budget.max_depth, left - 1)
            context = DraftContext(prompt + answer[:position], Budget(budget.max_nodes, max(depth, 0)),
                                   SamplingParams(), None)
            tree = drafter.propose(context) if depth > 0 else DraftTree.empty()
            if controller is not None:
                tree = controller.trim(tree, charges.draft)
            if isinstance(tree, Budget):  # not worth verifying: a plain run instead (the draft was paid)
                steps = min(tree.plain_steps, left)
                draft_s, run_s = charges.jitter(charges.draft), charges.jitter(charges.plain_run(steps))
                seconds += draft_s + run_s
                position += steps
                controller.observe(StepStats(0, 0, 0, draft_s=draft_s, verify_s=run_s, step_s=draft_s + run_s,
                                             plain_steps=steps, proposed_nodes=1))
                continue
            path = accepted_path(tree, answer, position)
            accepted = len(path)
            if policy == "oracle" and len(tree):  # verify only what pays, knowing the answer (an upper bound)
                step = charges.draft + charges.cost.verify_s(len(tree)) + charges.other
                if (accepted + 1) / step < 1.0 / charges.plain:
                    run_s = charges.jitter(charges.draft + charges.plain_run(1))
                    seconds += run_s
                    position += 1
                    continue
            draft_s, verify_s = charges.jitter(charges.draft), charges.jitter(charges.cost.verify_s(len(tree)))
            step_s = draft_s + verify_s + charges.jitter(charges.other)
            seconds += step_s
            position += accepted + 1
            if controller is not None:
                controller.observe(StepStats(len(tree), max_depth(tree), accepted,
                                             draft_s, verify_s, step_s, tree, path))
        per_category[category][0] += len(answer)
        per_category[category][1] += seconds
    if controller is not None and os.environ.get("VERBOSE"):
        print(policy, controller._counters, "draft avg", controller._draft_avg, "cheap", controller._cheap(),
              "gap", controller._probe_gap)
    return dict(per_category)


def main(results_path: str, costs_path: str, static: str = "ngram@static:max_depth=8,max_nodes=16") -> None:
    results, profile = json.load(open(results_path)), json.load(open(costs_path))
    config = results["config"]
    _, tokenizer, _ = load_model(config["target"], "float32", "cpu")
    template = BenchSettings(["ar"], template=config["template"]).template
    questions = {q.question_id: q for q in load_questions(config["data"], config["categories"] or (), None, None,
                                                             config["field"])}
    cases = []
    for record in results["records"]:
        if record["method"] != "ar" or record["turn"] != 0 or record["run"] != 0:
            continue
        question = questions[record["question_id"]]
        prompt = first_turn_ids(tokenizer, question, template)
        answer = record["token_ids"]
        answer = json.loads(answer) if isinstance(answer, str) else answer
        if len(prompt) != record["prompt_tokens"]:
            print(f"question {record['question_id']}: prompt {len(prompt)} tokens, the run had "
                  f"{record['prompt_tokens']}: skipped")
            continue
        cases.append((question.category, prompt, answer))
    charges = Charges(results, profile, static)
    print(f"{len(cases)} answers; plain token {1e3 * charges.plain:.3f} ms, draft {1e3 * charges.draft:.3f} ms a "
          f"step, rest {1e3 * charges.other:.3f} ms, verify_s {{n: ms}} "
          f"{ {n: round(1e3 * s, 3) for n, s in charges.points.items()} }, noise {NOISE}")
    rates = {policy: replay(policy, cases, charges) for policy in ("ar", "static", "oracle", "goodput")}
    categories = sorted(rates["ar"])
    print(f"{'category':>22} " + " ".join(f"{p:>10}" for p in rates))
    for category in categories + ["overall"]:
        cells = []
        for policy, table in rates.items():
            pick = table.values() if category == "overall" else [table[category]]
            tokens, seconds = sum(t for t, _ in pick), sum(s for _, s in pick)
            base = rates["ar"].values() if category == "overall" else [rates["ar"][category]]
            speed = (tokens / seconds) / (sum(t for t, _ in base) / sum(s for _, s in base))
            cells.append(f"{speed:9.3f}x")
        print(f"{category:>22} " + " ".join(cells))


if __name__ == "__main__":
    main(*sys.argv[1:])
