"""Write a jsonl of code questions for a code model: N held-out code-completion prompts (category "code", raw text)
and the first M coding questions of Spec-Bench's MT-bench (category "coding", two turns, chat template).
    python3 evals/scripts/code_questions.py OUT.jsonl [N] [M]"""

import json
import sys

from specdec.evals.data import load_questions, shared_dir


def main(out: str, code: int = 4, coding: int = 4) -> None:
    held_out = load_questions(f"code:{code}")
    records = [json.loads(line) for line in open(shared_dir() / "data" / "spec_bench" / "question.jsonl")]
    mt_bench = [{k: r[k] for k in ("question_id", "category", "turns")} for r in records if r["category"] == "coding"]
    with open(out, "w") as sink:
        for question in held_out:
            sink.write(json.dumps({"question_id": question.question_id, "category": question.category,
                                   "turns": list(question.turns)}) + "\n")
        for record in mt_bench[:coding]:
            sink.write(json.dumps(record) + "\n")
    print(f"{len(held_out)} held-out code prompts + {len(mt_bench[:coding])} MT-bench coding questions -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
