"""`specdec bench --batch-size 1,4,16`: batched decoding, each method at each batch size over the same prompts.

Methods: `ar` (batched plain decoding on specdec's batched cache: the baseline at each batch size, never batch-1
decoding), drafter specs (`ngram`, ...: `generate(prompts, batch_size=B)`; `ngram#whole`: with
`batch_allocate=False`, every row's whole proposal verified), `hf` (HF's batched greedy `generate`, left-padded, as
the peer) and `hf-static` (the same with HF's static cache, whose decode step HF compiles on a GPU; every batch
padded to one shape). Per batch size and method: tokens/s, milliseconds per output token per sequence (the wall
time a sequence waits per token: seconds x B / tokens), speedup over `ar` at the same batch size, and at
temperature 0 how many answers equal batch-1 `ar`'s (HF's padded batches may differ by rounding). Each method first
runs untimed on the B longest prompts: the batched cache sized, its graphs captured, kernels compiled. `--backend
native` runs ar and the drafter methods on the native batched forward (`specdec.batch_native`). `--runs N` times
each batch size's methods N times in turn and reports the median (the spread in brackets): at tens of prompts a
GPU run's wall time varies by tens of percent."""

from __future__ import annotations

from typing import Sequence

import torch
from rich.table import Table

from specdec.evals.methods import BenchContext, _timed, split_controller
from specdec.generator import SpeculativeGenerator

WHOLE = "#whole"  # a method suffix: the rows' whole proposals, no batch allocation (`generate(batch_allocate=False)`)


def hf_batched(context: BenchContext, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
               static: bool = False) -> list:
    """HF `generate` (greedy), `batch_size` prompts at a time, left-padded -> new token ids per prompt. static: with
    HF's static cache (`cache_implementation="static"`, whose decode step HF compiles on a GPU), each batch's cache
    sized to the longest prompt of all plus the new tokens, so every batch has one shape (one compilation)."""
    model, tokenizer = context.model, context.tokenizer
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    eos = model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else eos or [])
    answers = []
    longest, rows = max(map(len, prompts)), min(batch_size, len(prompts))
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first: first + batch_size]
        width = longest if static else max(map(len, chunk))
        chunk = chunk + [chunk[-1]] * (rows - len(chunk)) if static else chunk  # static: a last batch filled with
        # copies (their answers not counted)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, **({"cache_implementation": "static"} if static else {}))
        for row in out[:, width:].tolist()[: len(prompts) - first]:
            cut = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
            answers.append(row[:cut])
    return answers


def differences(context: BenchContext, prompts: list[list[int]], answers: list[list[int]],
                reference: list[list[int]], tie_tolerance: float = 0.0) -> dict:
    """Each answer that differs from batch-1 `ar`'s, classified at its first differing position as the main bench
    does (`runner.tie_gap`): a near-tie (the target's two logits within the rounding tolerance of its dtype: a batch's
    shape changes the rounding; on the native backend in half precision the tolerance is also at least twice the
    native forward's own error of the gap there, `native_row_gap` against float32) or algorithmic ->
    {"near_ties": n, "algorithmic": n, "algorithmic_cases": [{prompt, position, gap, tolerance}]}."""
    import copy
    import functools

    from specdec.evals.runner import tie_gap

    model = context.model
    half = model.dtype in (torch.bfloat16, torch.float16) and not tie_tolerance
    exact = functools.cache(lambda: copy.deepcopy(model).float()) if half else None
    counts = {"near_ties": 0, "algorithmic": 0, "algorithmic_cases": []}
    for index, (prompt, answer, expected) in enumerate(zip(prompts, answers, reference)):
        if answer == expected:
            continue
        position = next((i for i, (a, b) in enumerate(zip(expected, answer)) if a != b), min(len(expected),
                                                                                             len(answer)))
        gap, tolerance = tie_gap(model, prompt, expected, answer, position, tie_tolerance, exact,
                                 native_row_gap if context.backend == "native" else None)
        near = gap is not None and gap <= tolerance
        counts["near_ties" if near else "algorithmic"] += 1
        if not near:  # what to examine: the prompt, where, and by how much
            counts["algorithmic_cases"].append({"prompt": index, "position": position, "gap": gap,
                                                "tolerance": tolerance})
    return counts


@torch.inference_mode()
def native_row_gap(model, token_ids: list[int], expected: int, got: int, neighbours: Sequence = ()) -> float:
    """logit(expected) - logit(got) after `token_ids` by the native batched forward (the context prefilled but its
    last token, which one step scores), the path batched `ar` runs on a native backend; `neighbours`: other rows'
    contexts, prefilled and scored in the same step (row 0 is this one)."""
    from specdec.batch_native import NativeBatchedBackend
    from specdec.tree import DraftTree

    contexts = [list(token_ids), *map(list, neighbours)]
    backend = NativeBatchedBackend(model, len(contexts), max(map(len, contexts)) + 8, graphs=False)
    backend.prefill_rows(0, [context[:-1] for context in contexts])
    logits = backend.score([context[-1] for context in contexts], [DraftTree.empty()] * len(contexts))[0][0].float()
    return float(logits[expected] - logits[got])


def run_batches(context: BenchContext, prompts: list[list[int]], methods: list[str], batch_sizes: list[int],
                max_new_tokens: int, tie_tolerance: float = 0.0, runs: int = 1) -> dict:
    """Every method at every batch size; returns rows of measurements and the lossless counts (at temperature 0,
    differences from batch-1 `ar` classified; tie_tolerance: as `specdec bench --tie-tolerance`, 0 = by dtype).
    runs > 1: each batch size's methods are timed `runs` times in turn (ar, ngram, ..., ar, ngram, ...: a drift of
    the machine touches every method alike) and each row reports the median run (of an even count, the faster of
    the middle two); `seconds_runs` keeps them all."""
    if "ar" not in methods:
        raise ValueError("--batch-size needs 'ar' among the methods: the baseline at each batch size")
    if any(size < 1 for size in batch_sizes):
        raise ValueError(f"--batch-size takes sizes >= 1, got {batch_sizes}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"--runs must be an integer >= 1, got {runs!r}")
    backend = context.make_backend()  # "native": batches run on the native forward (`specdec.batch_native`)
    base = SpeculativeGenerator(context.model, tokenizer=context.tokenizer, drafter="ngram",
                                controller=context.controller, backend=backend)
    from specdec.batch import decode_batch

    options = dict(max_new_tokens=max_new_tokens, temperature=context.params.temperature, top_p=context.params.top_p,
                   top_k=context.params.top_k, seed=context.params.seed, stop=(), chat=False)
    reference = [out.token_ids for out in decode_batch(base, prompts, 1, options, plain=True)]
    rows = []
    for size in batch_sizes:
        runners = {}
        for method in methods:
            if method in ("hf", "hf-static"):
                generator = None

                def run(chosen, tokens, static=method == "hf-static"):
                    return hf_batched(context, chosen, size, tokens, static)
            else:
                spec, whole = method.removesuffix(WHOLE), method.endswith(WHOLE)
                drafter, controller = split_controller(spec)
                generator = base if method == "ar" else SpeculativeGenerator(
                    context.model, tokenizer=context.tokenizer, drafter=drafter,
                    controller=controller or context.controller, backend=backend)

                def run(chosen, tokens, generator=generator, plain=method == "ar", allocate=not whole):
                    return [o.token_ids for o in decode_batch(generator, chosen, size, {
                        **options, "max_new_tokens": tokens}, plain=plain, allocate=allocate)]
            longest = sorted(prompts, key=len)[-size:]  # untimed: the batched cache the timed run reuses (sized
            run(longest, max_new_tokens)  # for the longest prompts and all the tokens), graphs, compiles
            runners[method] = (run, generator)
        timed = {method: [] for method in methods}
        for _ in range(runs):
            for method, (run, generator) in runners.items():
                answers, seconds = _timed(lambda: run(prompts, max_new_tokens))
                steps = None if generator is None else generator.batch_stats.as_dict()
                timed[method].append((seconds, answers, steps))
        for method in methods:
            seconds, answers, steps = sorted(timed[method], key=lambda kept: kept[0])[(runs - 1) // 2]  # median
            tokens = sum(map(len, answers))
            rows.append({"batch_size": size, "method": method, "tokens": tokens, "seconds": seconds, "steps": steps,
                         "seconds_runs": [kept[0] for kept in timed[method]],
                         "tokens_per_s": tokens / seconds, "ms_per_token_per_seq": 1000 * seconds * min(size, len(
                             prompts)) / tokens, "identical_to_ar": sum(a == r for a, r in zip(answers, reference)),
                         **(differences(context, prompts, answers, reference, tie_tolerance)
                            if context.params.greedy else {})})
    for row in rows:
        ar = next(r for r in rows if r["batch_size"] == row["batch_size"] and r["method"] == "ar")
        row["speedup"] = row["tokens_per_s"] / ar["tokens_per_s"]
    return {"rows": rows, "prompts": len(prompts), "greedy": context.params.greedy, "backend": context.backend,
            "runs": runs}


def same_as_ar(row: dict, result: dict) -> str:
    """"12/12", or "10/12 (2 near-tie)", "9/12 (1 near-tie, 2 algorithmic)"; "-" when sampled."""
    if not result["greedy"]:
        return "-"
    notes = [f"{row[key]} {name}" for key, name in (("near_ties", "near-tie"), ("algorithmic", "algorithmic"))
             if row.get(key)]
    return f"{row['identical_to_ar']}/{result['prompts']}" + (f" ({', '.join(notes)})" if notes else "")


COLUMNS = ("batch", "method", "tok/s", "ms/token/seq", "speedup vs ar (same batch)", "speculative steps",
           "ms a step: spec, plain", "ms a row start: set-up, prefill (GPU)", "= batch-1 ar")


def steps_cells(row: dict) -> tuple[str, str]:
    """"12/130" speculative steps of all, and "6.1, 2.7" mean ms of a speculative and of a plain step ("-" for the
    HF peers, whose steps are HF's own)."""
    steps = row.get("steps")
    if not steps:
        return "-", "-"
    count = steps["steps"]
    mean = [f"{sum(steps['per_step_ms'][kind].values()):.1f}" if count[kind] else "-"
            for kind in ("speculative", "plain")]
    return f"{count['speculative']}/{count['speculative'] + count['plain']}", ", ".join(mean)


def rate_cell(row: dict) -> str:
    """"2869.0", or over several runs the median's and the spread: "2869.0 (2482-3104)"."""
    cell = f"{row['tokens_per_s']:.1f}"
    seconds = row.get("seconds_runs") or []
    if len(seconds) > 1:
        low, high = row["tokens"] / max(seconds), row["tokens"] / min(seconds)
        digits = 0 if low >= 100 else 1
        cell += f" ({low:.{digits}f}-{high:.{digits}f})"
    return cell


def starts_cell(row: dict) -> str:
    """"0.4, 2.1 (1.8)": mean ms a row's start took outside the steps, its set-up and its prefill in host time (and the
    prefill's device time, on a GPU); "-" for the HF peers."""
    starts = (row.get("steps") or {}).get("starts")
    if not starts or not starts["rows"]:
        return "-"
    per_row = {key: 1000 * starts.get(key, 0.0) / starts["rows"] for key in ("setup_s", "prefill_s", "prefill_gpu_s")}
    device = f" ({per_row['prefill_gpu_s']:.1f})" if per_row["prefill_gpu_s"] else ""
    return f"{per_row['setup_s']:.1f}, {per_row['prefill_s']:.1f}{device}"


def cells(row: dict, result: dict) -> list[str]:
    return [str(row["batch_size"]), row["method"], rate_cell(row), f"{row['ms_per_token_per_seq']:.1f}",
            f"{row['speedup']:.2f}x", *steps_cells(row), starts_cell(row), same_as_ar(row, result)]


def batch_table(result: dict) -> Table:
    table = Table(title=f"batched decoding: {result['prompts']} prompts")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(*cells(row, result))
    return table


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(row, result)) + " |" for row in result["rows"]]
    return "\n".join(lines) + "\n"
