"""What a speculative step costs right after a plain run, against right after another speculative step, in the
single-sequence loop on the native backend (SmolLM2-135M shape, random init: nothing to carry).

On the H200 (run h_gate_h200) goodput's gated speculative steps measured 1.7-1.9 ms a step while static depth 8's
cost ~1.2 ms all in, with the same drafter, tree sizes and backend; plain runs cost ~0.68 ms a token in both. This
script runs the loop with fixed policies on a prompt the `ngram` drafter always matches (a random block repeated)
and logs every step the controller observes:
    spec      every step a draft of up to 16 nodes, depth 8 (static)
    alt8      a plain run of 8, then a speculative step, in turn
    alt1      one plain step, then a speculative step, in turn
    goodput   the real controller
Per policy: the median draft / verify / step seconds of speculative steps, split by what came before them (a plain
run or a speculative step), and of plain runs per token. Then a torch.profiler table of one `alt8` generation.

    python3 evals/scripts/step_switch_cost.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from batch_step_cost import DEVICE, model_of  # this folder's step-cost script: the random-init shapes
from specdec import SpeculativeGenerator
from specdec.backends.native import native_backend
from specdec.controllers import Budget, make_controller

GENERATIONS, TOKENS = 8, 256


class Fixed:
    """A controller that cycles through fixed budgets."""

    def __init__(self, budgets):
        self.budgets, self.at = budgets, 0

    def budget(self, history):
        budget = self.budgets[self.at % len(self.budgets)]
        self.at += 1
        return budget

    def observe(self, step):
        pass


def logged(controller, log: list):
    """Wrap `observe` to keep every step's numbers (kind, nodes, accepted, draft_s, verify_s, step_s)."""
    observe = controller.observe

    def record(step):
        log.append(("plain" if step.plain_steps else "spec", step.plain_steps, step.drafted_nodes,
                    step.accepted_len, step.draft_s, step.verify_s, step.step_s))
        observe(step)

    controller.observe = record
    return controller


def summary(log: list) -> dict:
    by = defaultdict(list)
    for before, step in zip([None] + log[:-1], log):
        kind = step[0]
        if kind == "spec":
            by[f"spec after {before[0] if before else 'start'}"].append(step)
        else:
            by[f"plain run of {step[1]}"].append(step)
    out = {}
    for key, steps in sorted(by.items()):
        per = max(steps[0][1], 1) if key.startswith("plain") else 1
        out[key] = dict(count=len(steps), nodes=statistics.median(s[2] for s in steps),
                        draft_ms=1e3 * statistics.median(s[4] for s in steps),
                        verify_ms=1e3 * statistics.median(s[5] for s in steps) / per,
                        step_ms=1e3 * statistics.median(s[6] for s in steps) / per)
    return out


def main(out: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    model = model_of("135m" if DEVICE == "cuda" else "tiny")
    backend = native_backend(model, max_len=2048) if DEVICE == "cuda" else "hf"
    block = torch.randint(model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = block * 6
    spec, plain8, plain1 = Budget(16, 8), Budget(0, 0, plain_steps=8), Budget(0, 0, plain_steps=1)
    policies = {"spec": lambda: Fixed([spec]), "alt8": lambda: Fixed([plain8, spec]),
                "alt1": lambda: Fixed([plain1, spec]), "goodput": lambda: make_controller("goodput")}
    results, lines = {}, [f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'} · torch {torch.__version__}"
                          f" · SmolLM2-135M shape, random init · {GENERATIONS} generations of {TOKENS} tokens"]
    for name, make in policies.items():
        log: list = []
        generator = SpeculativeGenerator(model, drafter="ngram", controller=logged(make(), log), backend=backend)
        backend = generator.backend  # one backend (its graphs) for every policy
        for _ in range(2):  # warm-up: graphs, the cost profile
            generator.generate(prompt, max_new_tokens=TOKENS)
        log.clear()
        walls = []
        for _ in range(GENERATIONS):
            walls.append(generator.generate(prompt, max_new_tokens=TOKENS).stats.wall_s)
        results[name] = dict(wall_ms=1e3 * statistics.median(walls), steps=summary(log))
        lines.append(f"{name}: wall {results[name]['wall_ms']:.2f} ms a generation")
        for key, row in results[name]["steps"].items():
            unit = " a token" if key.startswith("plain") else ""
            lines.append(f"    {key:>22}: n={row['count']:4d} nodes {row['nodes']:4.1f}  draft {row['draft_ms']:.3f}  "
                         f"verify {row['verify_ms']:.3f}  step {row['step_ms']:.3f} ms{unit}")
        print("\n".join(lines[-1 - len(results[name]["steps"]):]), flush=True)
    (Path(out) / "step_switch_cost.json").write_text(json.dumps(results, indent=1))
    if DEVICE == "cuda":
        generator = SpeculativeGenerator(model, drafter="ngram", controller=Fixed([plain8, spec]), backend=backend)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            generator.generate(prompt, max_new_tokens=64)
        table = profile.key_averages().table(sort_by="cpu_time_total", row_limit=30)
        lines.append(table)
        print(table)
    (Path(out) / "step_switch_cost.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
