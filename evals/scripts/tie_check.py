"""Re-examine a bench run's mismatches in float32 on this machine: for each first differing position (turn 0),
the target's logit gap between ar's token and the method's, computed by a float32 copy of the target and by the
run's dtype here. A float32 gap within a few bf16 ulps means a rounding flip between the run's two computations,
not a different algorithm. (The run's own device rounds its own way: this checks the true gap, not the flip.)
    python3 evals/scripts/tie_check.py RESULTS.json [TARGET]"""

import copy
import json
import sys

import torch

from specdec.evals.data import load_questions
from specdec.evals.runner import encode_turn, logit_gap
from specdec.models import load_model


def main(results: str, target: str | None = None) -> None:
    payload = json.load(open(results))
    config = payload["config"]
    model, tokenizer, _ = load_model(target or config["target"], torch.float32, "cpu")
    dtype = payload["env"]["dtype"]
    rounded = copy.deepcopy(model).to(getattr(torch, dtype))
    questions = {q.question_id: q for q in load_questions(config["data"])}
    ar = {(r["question_id"], r["turn"]): r["token_ids"] for r in payload["records"] if r["method"] == "ar"}
    for mismatch in payload["lossless"]["mismatches"]:
        if mismatch["turn"] != 0 or mismatch["kind"] != "algorithmic":
            continue
        question = questions[mismatch["question_id"]]
        prompt = encode_turn(tokenizer, [{"role": "user", "content": question.turns[0]}], config["template"])
        context = prompt + ar[(mismatch["question_id"], 0)][: mismatch["position"]]
        exact_gap, scale = logit_gap(model, context, mismatch["expected"], mismatch["got"])
        rounded_gap, _ = logit_gap(rounded, context, mismatch["expected"], mismatch["got"])
        print(f"{mismatch['method']:>34} q{mismatch['question_id']} @{mismatch['position']}: run gap "
              f"{mismatch['logit_gap']:.4f}; here float32 gap {exact_gap:+.4f} (logits up to {scale:.2f}), "
              f"{dtype} gap {rounded_gap:+.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
