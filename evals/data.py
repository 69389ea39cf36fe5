"""Benchmark questions: Spec-Bench's question.jsonl, any jsonl with `turns`, a `datasets` dataset, or the
held-out code-completion prompts of specdec's own trained models.

A `Question` has one or more user turns; turn 2 sees the model's own turn-1 answer (see `evals.runner`)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence


# Spec-Bench reports the 8 MT-bench categories together as one subtask
SPEC_BENCH_GROUPS = {c: "mt_bench" for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                              "stem", "humanities")}


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]


def shared_dir() -> Path:
    """The `shared` folder beside the checkout (or `$SPECDEC_SHARED`)."""
    if os.environ.get("SPECDEC_SHARED"):
        return Path(os.environ["SPECDEC_SHARED"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "shared").is_dir():
            return parent / "shared"
    return Path.cwd().parent / "shared"


def load_questions(data: str, categories: Sequence[str] = (), limit: int | None = None,
                   shuffle_seed: int | None = None, field: str = "turns", split: str = "test") -> list[Question]:
    """`data`: "spec_bench", "code[:N]" / "code-rewrite[:N]" (held-out code prompts, one or two turns), a .jsonl
    path, or a `datasets` name / path."""
    if data == "spec_bench":
        path = shared_dir() / "data" / "spec_bench" / "question.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"Spec-Bench questions not found at {path}; set SPECDEC_SHARED or pass a path")
        questions = [replace(q, category=SPEC_BENCH_GROUPS.get(q.category, q.category))
                     for q in _from_jsonl(path, field)]
    elif data.split(":")[0] in ("code", "code-rewrite"):
        questions = _code_prompts(data)
    elif data.endswith((".jsonl", ".json")):
        if not Path(data).exists():
            raise FileNotFoundError(f"data file {data} does not exist")
        questions = _from_jsonl(Path(data), field)
    else:
        questions = _from_datasets(data, field, split)
    return _select(questions, categories, limit, shuffle_seed)


def _select(questions: list[Question], categories: Sequence[str], limit: int | None,
            shuffle_seed: int | None) -> list[Question]:
    if categories:
        known = sorted({q.category for q in questions})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; this data has: {', '.join(known)}")
        questions = [q for q in questions if q.category in categories]
    if shuffle_seed is not None:
        questions = questions[:]
        random.Random(shuffle_seed).shuffle(questions)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        questions = _per_category_limit(questions, limit)
    return questions


def _per_category_limit(questions: list[Question], limit: int) -> list[Question]:
    """The first `limit` questions of each category, in the original order."""
    taken: dict[str, int] = {}
    kept = []
    for question in questions:
        if taken.get(question.category, 0) < limit:
            taken[question.category] = taken.get(question.category, 0) + 1
            kept.append(question)
    return kept


def _record_to_question(record: dict, index: int, field: str) -> Question:
    turns = record.get(field, record.get("prompt", record.get("text")))
    if isinstance(turns, str):
        turns = [turns]
    if not turns or not all(isinstance(t, str) and t for t in turns):
        raise ValueError(f"record {index} has no usable '{field}' (a string or a list of strings)")
    return Question(str(record.get("question_id", index)), str(record.get("category", "default")), tuple(turns))


def _from_jsonl(path: Path, field: str) -> list[Question]:
    questions = []
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{index + 1} is not valid JSON ({error})") from None
                questions.append(_record_to_question(record, index, field))
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def _from_datasets(name: str, field: str, split: str) -> list[Question]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split) if not Path(name).is_dir() else \
            datasets.load_from_disk(name)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean "not loadable"
        raise ValueError(f"cannot load {name!r} as a jsonl file or a datasets dataset ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    return [_record_to_question(dict(record), index, field) for index, record in enumerate(dataset)]


def _code_prompts(data: str) -> list[Question]:
    """`code[:N]`: N held-out code-completion prompts (default 20), category "code".
    `code-rewrite[:N]`: the same prompts as two turns, the second asking for the code again (raw text: the prompt,
    the model's answer, then the prompt once more, so the answer is worth copying), category "code-rewrite"."""
    from specdec.train.pretrain import heldout_code_prompts

    kind, _, count = data.partition(":")
    prompts = heldout_code_prompts(int(count or 20))
    if kind == "code":
        return [Question(f"code-{i}", "code", (prompt,)) for i, prompt in enumerate(prompts)]
    again = "# The same file again, unchanged:\n"
    return [Question(f"rewrite-{i}", "code-rewrite", (prompt, again + prompt)) for i, prompt in enumerate(prompts)]
