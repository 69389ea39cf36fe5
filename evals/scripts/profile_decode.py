"""Where does a decode step's time go on the GPU? specdec's HF backend vs HF `generate` vs a bare HF loop, on a
random-init model of the zoo target's shape (timing does not depend on weight values). Prints a table and the top
CPU-side ops of one profiled run of each."""

import sys
import time

import torch
from transformers import DynamicCache

from specdec.backends.hf import HFBackend
from specdec.evals.step_bench import build_model
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule

NEW = 128
model = build_model("zoo", "sdpa", "cuda", torch.bfloat16)  # the zoo target's shape, random weights
model.generation_config.eos_token_id = None
prompt = torch.randint(0, 8192, (300,)).tolist()
backend = HFBackend(model)


def ours():
    return reference_decode(backend, prompt, SamplingParams(), StopRule(NEW))


def hf():
    ids = torch.tensor([prompt], device="cuda")
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False)[0, len(prompt):].tolist()


@torch.no_grad()
def bare():
    cache = DynamicCache()
    out = model(torch.tensor([prompt], device="cuda"), past_key_values=cache)
    token = out.logits[:, -1:].argmax(-1)
    tokens = []
    for _ in range(NEW):
        tokens.append(int(token))
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    return tokens


def timed(fn, reps=5):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] / NEW * 1e3, times[0] / NEW * 1e3, times[-1] / NEW * 1e3


for fn in (ours, hf, bare):
    fn()
print("greedy outputs equal:", ours() == hf() == bare())
for fn in (ours, hf, bare, ours, hf, bare):
    print(f"{fn.__name__:>6}: median {timed(fn)[0]:.2f} ms/token (min {timed(fn)[1]:.2f})")
from torch.profiler import ProfilerActivity, profile

for fn in (ours, hf):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    print(f"==== {fn.__name__}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))
sys.stdout.flush()
