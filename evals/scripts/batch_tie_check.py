"""Examine the batch bench's "algorithmic" differences in batched `ar` itself: is the target's logit gap at the first
differing position within what bfloat16 computations of that very logit scatter by?

The batch bench classifies a difference by one bf16 computation (HF's full forward) against a float32 copy. Batched
`ar` and its batch-1 reference run another path: the native forward, one token at a time, over a bf16 KV cache that
earlier steps wrote. This script rebuilds the bench's prompts, re-decodes the named prompts at batch 1 and in their
batch (the bench's own calls: `decode_batch(..., plain=True)`), and at each first differing position computes the
gap logit(reference token) - logit(batched token) by:
    fp32-hf        a float32 copy, HF's full forward (the truth, to float32 rounding)
    bf16-hf        HF's bf16 full forward (what the bench's tolerance came from)
    native-b1      the native batched backend, 1 row: prefill the context, score the last token (bf16)
    native-bB      the same row among the batch's neighbours (B rows, each its own context), one step
A gap that changes sign among the bf16 paths, or whose bf16 values scatter around the float32 one by about its size,
is a rounding flip; a float32 gap far outside the bf16 scatter is not.

    python3 evals/scripts/batch_tie_check.py OUT_DIR TARGET LIMIT MAX_NEW_TOKENS BATCH_SIZE PROMPT[,PROMPT...]
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from specdec import SpeculativeGenerator
from specdec.batch import decode_batch
from specdec.evals.batch_bench import native_row_gap
from specdec.evals.data import load_questions
from specdec.evals.runner import BenchSettings, first_turn_ids, logit_gap
from specdec.models import load_model


def bench_prompts(tokenizer, limit: int) -> list[list[int]]:
    """The prompts of `specdec bench --data spec_bench --limit LIMIT --batch-size ...` (template auto, raw code)."""
    template = BenchSettings(["ar"], template="auto").template
    return [first_turn_ids(tokenizer, question, template)
            for question in load_questions("spec_bench", (), limit, None, "turns")]


def main(out: str, target: str, limit: str, max_new: str, size: str, which: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer, _ = load_model(target, dtype, device)
    exact = copy.deepcopy(model).float()
    prompts = bench_prompts(tokenizer, int(limit))
    batch, wanted = int(size), [int(p) for p in which.split(",")]
    gen = SpeculativeGenerator(model, tokenizer=tokenizer, drafter="ngram", backend="native")
    options = dict(max_new_tokens=int(max_new), temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=(), chat=False)
    batched = [o.token_ids for o in decode_batch(gen, prompts, batch, options, plain=True)]
    report = []
    for index in wanted:
        reference = decode_batch(gen, [prompts[index]], 1, options, plain=True)[0].token_ids
        answer = batched[index]
        position = next((i for i, (a, b) in enumerate(zip(reference, answer)) if a != b), None)
        case = {"prompt": index, "batch_size": batch, "reproduced": position is not None, "position": position}
        if position is not None:
            expected, got = reference[position], answer[position]
            context = prompts[index] + reference[:position]
            first = index - index % batch  # its first batch's neighbours (later refills differ: an approximation)
            neighbours = [prompts[i] + batched[i][:position]
                          for i in range(first, min(first + batch, len(prompts))) if i != index]
            case.update(expected=expected, got=got, gaps={
                "fp32-hf": logit_gap(exact, context, expected, got)[0],
                "bf16-hf": logit_gap(model, context, expected, got)[0],
                "native-b1": native_row_gap(model, context, expected, got),
                f"native-b{len(neighbours) + 1}": native_row_gap(model, context, expected, got, neighbours),
            })
        report.append(case)
        print(json.dumps(case))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "batch_tie_check.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
