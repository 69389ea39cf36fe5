"""Smoke run of the batched `model` drafter (a mechanism check on a toy, not a result): the zoo's cpu-tiny target
drafts for itself (every chain accepted, so the draft's cost is all that differs), Spec-Bench first turns, greedy,
on this machine's CPU. Every step speculates (the batch gate is bypassed: on a self-draft a chain costs as many
forwards as the tokens it gives, and the gate rightly steps plainly). Per batch size: batched `ar`, `model` chains
drafted for all rows together (one draft forward per depth) and the same chains drafted row by row
(`batched=False`); tokens/s, speculative steps, the draft phase's ms a speculative step, and whether every answer
equals batch-1 `ar`.

    python evals/scripts/batch_draft_smoke.py OUT.md [batch sizes, default 4,16] [prompts, default 32]
"""

import json
import sys
import time

import torch

from host_timing import say
from specdec import SpeculativeGenerator
from specdec.batch import BatchGate, decode_batch
from specdec.evals.data import load_questions
from specdec.models import load_model, resolve_model

sizes = [int(size) for size in (sys.argv[2] if len(sys.argv) > 2 else "4,16").split(",")]
count = int(sys.argv[3]) if len(sys.argv) > 3 else 32
torch.set_num_threads(max(torch.get_num_threads(), 1))
BatchGate.speculate = lambda self: True  # every step drafts (see the docstring)
path = resolve_model("zoo:cpu-tiny")
model, tokenizer, _ = load_model(path, "float32", "cpu")
questions = load_questions("spec_bench", limit=6)[:count]
prompts = [tokenizer(q.turns[0]).input_ids[:200] for q in questions]
options = dict(max_new_tokens=48, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=(), chat=False)
baseline = SpeculativeGenerator(model, tokenizer)
reference = [out.token_ids for out in decode_batch(baseline, prompts, 1, options, plain=True)]
say(f"# batched model drafter smoke: zoo:cpu-tiny drafting for itself, {len(prompts)} prompts, 48 tokens, CPU "
    f"({torch.get_num_threads()} threads), float32, every step speculating")
say("")
say("| batch | method | tok/s | speedup vs ar | speculative steps | draft ms / spec step | = batch-1 ar |")
say("|---|---|---|---|---|---|---|")
for size in sizes:
    rates = {}
    for name, drafter in (("ar", "ngram"), ("model (batched)", f"model:path={path},mode=chain"),
                          ("model (row by row)", f"model:path={path},mode=chain,batched=False")):
        gen = SpeculativeGenerator(model, tokenizer, drafter=drafter, controller="static:max_depth=4,max_nodes=4")
        plain = name == "ar"
        decode_batch(gen, prompts[:size], size, options, plain=plain)  # warm-up (gate, caches)
        started = time.perf_counter()
        outputs = decode_batch(gen, prompts, size, options, plain=plain)
        seconds = time.perf_counter() - started
        tokens = sum(len(out.token_ids) for out in outputs)
        rates[name] = tokens / seconds
        stats = gen.batch_stats
        spec = stats.steps["speculative"]
        draft_ms = stats.per_step_ms("speculative")["draft"]
        same = sum(out.token_ids == ref for out, ref in zip(outputs, reference))
        say(f"| {size} | {name} | {rates[name]:.1f} | {rates[name] / rates['ar']:.2f}x | {spec}/"
            f"{spec + stats.steps['plain']} | {draft_ms:.1f} | {same}/{len(prompts)} |")
say("")
say(json.dumps({"sizes": sizes, "prompts": len(prompts)}))
