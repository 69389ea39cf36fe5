"""The benchmark loop: methods x runs x questions x turns, one target, one process (or one shard of several).

Multi-turn: each method answers turn 1, and its own answer goes into the conversation of turn 2 (as Spec-Bench does).
The lossless check compares every method's token ids with `ar`'s for the same question, turn and run."""

from __future__ import annotations

import copy
import functools
import math

from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specdec.backends.hf import context_window
from specdec.evals.data import Question
from specdec.evals.methods import BenchContext, Method, TurnRun, make_method

PLAIN_TEMPLATE = "### User:\n{content}\n\n### Assistant:\n"


@dataclass
class BenchSettings:
    methods: Sequence[str]
    max_new_tokens: int = 128
    runs: int = 1
    warmup: int = 1
    template: str = "auto"  # auto | chat | plain | none
    max_prompt_tokens: int | None = None  # longer prompts keep their last tokens (the context window's limit)

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"--runs must be >= 1, got {self.runs}")
        if "ar" not in self.methods:
            raise ValueError("the methods must include 'ar': every speedup is measured against it")
        if self.template not in ("auto", "chat", "plain", "none"):
            raise ValueError(f"--template must be auto, chat, plain or none, got {self.template!r}")


@dataclass
class TurnRecord:
    method: str
    run: int
    question_id: str
    category: str
    turn: int
    prompt_ids: list[int]
    result: TurnRun

    def as_dict(self) -> dict:
        """JSON form: the prompt as its length, the result's fields inline."""
        return {"method": self.method, "run": self.run, "question_id": self.question_id, "category": self.category,
                "turn": self.turn, "prompt_tokens": len(self.prompt_ids), **asdict(self.result)}


@dataclass
class BenchRecords:
    records: list[TurnRecord] = field(default_factory=list)
    interrupted: bool = False


def encode_turn(tokenizer, history: list[dict], template: str) -> list[int]:
    """Token ids of the conversation so far, ending where the assistant's next answer starts.

    none: raw text (code completion; later turns follow the earlier answer after a blank line); chat: the tokenizer's
    chat template; plain: a `### User / ### Assistant` transcript; auto: chat if the tokenizer has a template, else
    plain."""
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat":
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if template == "none":
        text = "".join(m["content"] if m["role"] == "user" else m["content"] + "\n\n" for m in history)
    else:
        text = "".join(PLAIN_TEMPLATE.format(content=m["content"]) if m["role"] == "user" else m["content"] + "\n\n"
                       for m in history)
    return list(tokenizer(text).input_ids)


def question_template(question: Question, template: str) -> str:
    """The template a question's turns are encoded with: raw text for code completion under `auto`."""
    return "none" if question.category.startswith("code") and template == "auto" else template


def first_turn_ids(tokenizer, question: Question, template: str) -> list[int]:
    """Token ids of a question's first turn, as the bench prompts it (`question_template`)."""
    return encode_turn(tokenizer, [{"role": "user", "content": question.turns[0]}],
                       question_template(question, template))


def answer(method: Method, tokenizer, question: Question,
           settings: BenchSettings) -> list[tuple[list[int], TurnRun]]:
    """All turns of one question: [(prompt ids, result)]; each turn sees this method's own earlier answers."""
    history, turns = [], []
    template = question_template(question, settings.template)
    for user_turn in question.turns:
        history.append({"role": "user", "content": user_turn})
        prompt_ids = encode_turn(tokenizer, history, template)
        if settings.max_prompt_tokens is not None:
            prompt_ids = prompt_ids[-settings.max_prompt_tokens:]
        result = method.run(prompt_ids, settings.max_new_tokens)
        history.append({"role": "assistant", "content": tokenizer.decode(result.token_ids, skip_special_tokens=True)})
        turns.append((prompt_ids, result))
    return turns


def run_bench(context: BenchContext, questions: Sequence[Question], settings: BenchSettings,
              show_progress: bool = True) -> BenchRecords:
    """Every method answers every question `runs` times, after `warmup` untimed questions each. Methods take turns
    question by question, so drift in the machine's speed touches them all alike. Ctrl-C stops the loop and returns
    what finished (`interrupted` set)."""
    out = BenchRecords()
    window = context_window(context.model.config)
    if window is not None:
        settings = replace(settings, max_prompt_tokens=window - settings.max_new_tokens)
        if settings.max_prompt_tokens < 1:
            raise ValueError(f"--max-new-tokens {settings.max_new_tokens} leaves no room for a prompt in the "
                             f"model's context window of {window}")
    methods = [make_method(spec, context) for spec in settings.methods]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not show_progress) as progress:
        tasks = {m.name: progress.add_task(f"{m.name:>14}", total=settings.runs * len(questions)) for m in methods}
        try:
            for method in methods:
                for question in questions[: settings.warmup]:
                    answer(method, context.tokenizer, question, settings)
            for run in range(settings.runs):
                for question in questions:
                    for method in methods:
                        for turn, (prompt_ids, result) in enumerate(
                                answer(method, context.tokenizer, question, settings)):
                            out.records.append(TurnRecord(method.name, run, question.question_id, question.category,
                                                          turn, prompt_ids, result))
                        progress.advance(tasks[method.name])
        except KeyboardInterrupt:
            out.interrupted = True
    return out


@dataclass(frozen=True)
class Mismatch:
    """kind: "near-tie" when the target's two competing logits at the first differing position are within
    `tolerance` (`near_tie_tolerance`: a rounding flip between one-token and many-token forwards), else
    "algorithmic"."""

    method: str
    run: int
    question_id: str
    turn: int
    position: int
    expected: int
    got: int
    logit_gap: float | None
    kind: str
    tolerance: float | None = None


def near_tie_tolerance(dtype: torch.dtype, scale: float, given: float = 0.0) -> float:
    """The largest logit gap that counts as a rounding flip: `given` where set (> 0), else the larger of a floor
    (1e-4 in float32, 0.125 in bfloat16 / float16) and two units in the last place of `dtype` at the competing
    logits' magnitude `scale`. A one-token and a many-token forward round differently by an ulp or two, and an ulp
    grows with the logit: in bfloat16 it is 0.125 for logits in [16, 32) and 0.25 in [32, 64)."""
    if given > 0:
        return given
    floor = 1e-4 if dtype in (torch.float32, torch.float64) else 0.125
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(scale)) if scale > 0 else 0.0
    return max(floor, 2 * ulp)


def check_lossless(records: Sequence[TurnRecord], model, tie_tolerance: float = 0.0,
                   reference: str = "ar") -> tuple[int, list[Mismatch]]:
    """Compare each method's tokens with `reference`'s (`ar`; same run, question, turn). Returns (turns compared,
    mismatches).
    `tie_tolerance`: a fixed near-tie tolerance; 0 = `near_tie_tolerance`'s rule for the model's dtype, widened in
    bfloat16 / float16 to twice the rounding error of the gap measured at that very position (the gap recomputed by a
    float32 copy of the target): after 30 layers a half-precision logit can be off by more than an ulp or two.

    A question whose earlier turn already differed is not compared again (its later prompts differ anyway)."""
    baseline = {(r.run, r.question_id, r.turn): r for r in records if r.method == reference}
    compared, mismatches, diverged = 0, [], set()
    half = model.dtype in (torch.bfloat16, torch.float16) and not tie_tolerance
    exact = functools.cache(lambda: copy.deepcopy(model).float()) if half else None
    for record in records:
        key = (record.run, record.question_id, record.turn)
        if record.method == reference or key not in baseline or (record.method, record.run, record.question_id) in diverged:
            continue
        compared += 1
        expected, got = baseline[key].result.token_ids, record.result.token_ids
        if expected == got:
            continue
        diverged.add((record.method, record.run, record.question_id))
        position = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        mismatches.append(_classify(record, baseline[key], position, model, tie_tolerance, exact))
    return compared, mismatches


def _classify(record: TurnRecord, reference: TurnRecord, position: int, model, tie_tolerance: float,
              exact=None) -> Mismatch:
    expected = reference.result.token_ids
    got = record.result.token_ids
    expected_token = expected[position] if position < len(expected) else -1
    got_token = got[position] if position < len(got) else -1
    gap = tolerance = None
    if reference.prompt_ids == record.prompt_ids:
        gap, tolerance = tie_gap(model, record.prompt_ids, expected, got, position, tie_tolerance, exact)
    kind = "near-tie" if gap is not None and gap <= tolerance else "algorithmic"
    return Mismatch(record.method, record.run, record.question_id, record.turn, position, expected_token, got_token,
                    gap, kind, tolerance)


def tie_gap(model, prompt_ids: list[int], expected: list[int], got: list[int], position: int,
            tie_tolerance: float = 0.0, exact=None, path_gap=None) -> tuple[float | None, float | None]:
    """(the target's logit gap between the two answers' tokens at their first differing `position`, the near-tie
    tolerance there); (None, None) where one answer ended first. exact: a float32 copy of a half-precision target
    (a callable), whose gap bounds this position's own rounding error (`check_lossless`); path_gap: with exact,
    `path_gap(model, context, expected, got)` -> the gap by the half-precision path that ran (where it is not HF's
    forward), whose own rounding error bounds it too."""
    if position >= min(len(expected), len(got)):
        return None, None
    context = list(prompt_ids) + list(expected[:position])
    signed, scale = logit_gap(model, context, expected[position], got[position])
    gap, tolerance = abs(signed), near_tie_tolerance(model.dtype, scale, tie_tolerance)
    if exact is not None:  # this position's own rounding error of the gap, against a float32 copy
        exact_signed, _ = logit_gap(exact(), context, expected[position], got[position])
        rounded = [signed]
        if path_gap is not None:
            rounded.append(path_gap(model, context, expected[position], got[position]))
        tolerance = max(tolerance, *(2 * abs(value - exact_signed) for value in rounded))
        gap = min(gap, abs(exact_signed))
    return gap, tolerance


@torch.inference_mode()
def logit_gap(model, token_ids: list[int], expected_token: int, got_token: int) -> tuple[float, float]:
    """(logit(expected) - logit(got), the larger of their magnitudes) of the target after `token_ids`, in one plain
    forward."""
    logits = model(input_ids=torch.tensor([token_ids], device=model.device)).logits[0, -1].float()
    pair = logits[[expected_token, got_token]]
    return float(pair[0] - pair[1]), float(pair.abs().max())
