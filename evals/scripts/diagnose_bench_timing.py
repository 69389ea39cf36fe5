"""Why was `ar` slower inside `specdec bench` (20-30 ms/token, spread 11-72) than in a controlled loop (~10 ms)?

Loads the zoo target the way `specdec bench` does and times our `ar` per question (ms/token) under conditions that
differ between the bench and the controlled profile, one factor at a time:

  alone        ar only, question after question
  interleaved  ar, then hf generate, then hf-lookup on each question (the bench's order)
  progress     alone, inside a live rich Progress bar (its refresh thread takes the GIL)
  gc-off       alone with the garbage collector disabled
  static       ar on the static-cache backend

and, for the slowest question of `interleaved`, the host time of each step (to tell spikes from an even slowdown).
Prints a table; writes diagnose.json under the directory given as argv[1].

    python3 evals/scripts/diagnose_bench_timing.py OUT_DIR [preset] [questions]
"""

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.progress import Progress

from specdec.evals.bench import BenchConfig, load_target
from specdec.evals.data import load_questions
from specdec.evals.methods import BenchContext, make_method
from specdec.evals.runner import BenchSettings, answer
from specdec.sampling import SamplingParams

out_dir = Path(sys.argv[1])
preset = sys.argv[2] if len(sys.argv) > 2 else "gpu-100m"
count = int(sys.argv[3]) if len(sys.argv) > 3 else 12
cuda = torch.cuda.is_available()
model, tokenizer, _, _ = load_target(BenchConfig(target=f"zoo:{preset}", device="cuda" if cuda else "cpu",
                                              dtype="bfloat16" if cuda else "float32"))
questions = load_questions(f"code:{count}", (), None, None, "turns")
settings = BenchSettings(methods=["ar"], max_new_tokens=128, max_prompt_tokens=2048 - 128)


def context(backend: str = "hf") -> BenchContext:
    return BenchContext(model, tokenizer, SamplingParams(), backend=backend)


def per_question(method, peers=(), progress=None) -> list[float]:
    """ms per new token of `method` on each question (peers answer the same question right after it)."""
    out = []
    for question in questions:
        (_, result), = answer(method, tokenizer, question, settings)
        out.append(result.seconds / max(1, len(result.token_ids)) * 1e3)
        for peer in peers:
            answer(peer, tokenizer, question, settings)
        if progress is not None:
            progress.advance(0)
    return out


ar = make_method("ar", context())
answer(ar, tokenizer, questions[0], settings)  # warm-up
results = {}
results["alone"] = per_question(ar)
hf, lookup = make_method("hf", context()), make_method("hf-lookup", context())
results["interleaved"] = per_question(ar, peers=(hf, lookup))
with Progress() as progress:
    progress.add_task("ar", total=len(questions))
    results["progress"] = per_question(ar, progress=progress)
gc.disable()
results["gc-off"] = per_question(ar)
gc.enable()
static = make_method("ar", context("static"))
answer(static, tokenizer, questions[0], settings)
results["static"] = per_question(static)
results["alone-again"] = per_question(ar)

# Host time per step of the slowest interleaved question, measured inside the backend's decode.
slowest = max(range(len(questions)), key=lambda i: results["interleaved"][i])
step_ms = []
backend = ar.backend
original = backend.decode


def timed_decode(state, token):
    start = time.perf_counter()
    logits = original(state, token)
    if cuda:
        torch.cuda.synchronize()
    step_ms.append((time.perf_counter() - start) * 1e3)
    return logits


backend.decode = timed_decode
answer(ar, tokenizer, questions[slowest], settings)
del backend.decode

prompt_tokens = [len(tokenizer(q.turns[0]).input_ids) for q in questions]
print(f"{'condition':>12} | median ms/token | min | max | per question")
for name, values in results.items():
    print(f"{name:>12} | {statistics.median(values):8.2f} | {min(values):6.2f} | {max(values):6.2f} | "
          + " ".join(f"{v:.1f}" for v in values))
print("prompt tokens per question:", prompt_tokens)
print(f"slowest question {slowest}: step ms median {statistics.median(step_ms):.2f}, min {min(step_ms):.2f}, "
      f"max {max(step_ms):.2f}, steps > 2x median: {sum(s > 2 * statistics.median(step_ms) for s in step_ms)}")
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "diagnose.json").write_text(json.dumps(
    {"per_question_ms_per_token": results, "prompt_tokens": prompt_tokens, "slowest": slowest,
     "slowest_step_ms": step_ms}, indent=1))
