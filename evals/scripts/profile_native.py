"""Where does a speculative step's time go on the native backend? On a random-init model of the zoo target's shape
(timing does not depend on weight values), in bf16 on the GPU: `ar` ms/token, then `ngram` on a repetitive prompt
with the generator's phase split (synchronised, as `specdec bench` reports it, and not), then the top host-side
functions of one cProfile'd run of each.

    python3 evals/scripts/profile_native.py [OUT_FILE]
"""

import cProfile
import io
import pstats

import torch
from host_timing import say, timed  # evals/scripts/host_timing.py

from specdec import SpeculativeGenerator
from specdec.backends.native import NativeBackend
from specdec.evals.step_bench import build_model
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule

NEW = 128
model = build_model("zoo", "sdpa", "cuda", torch.bfloat16)  # the zoo target's shape, random weights
model.generation_config.eos_token_id = None
motif = torch.randint(0, 8192, (40,)).tolist()
prompt = (motif * 10)[:300]  # a random model repeats nothing by itself; ngram still finds the prompt's motif
backend = NativeBackend(model, max_len=1024)


def ar() -> None:
    reference_decode(backend, prompt, SamplingParams(), StopRule(NEW))


def profile(fn, title: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    say(f"--- {title}: top host functions by own time\n{text.getvalue()}")


say(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
say(f"ar: {timed(ar) / NEW * 1e3:.3f} ms/token")
for sync in (True, False):
    generator = SpeculativeGenerator(model, drafter="ngram", backend=backend)
    generator.phase_sync = sync
    outputs = []
    seconds = timed(lambda: outputs.append(generator.generate(prompt, max_new_tokens=NEW)))
    stats = outputs[-1].stats
    per_forward = {phase: round(s / stats.target_forwards * 1e3, 3) for phase, s in stats.seconds.items()}
    say(f"ngram (phase_sync={sync}): {seconds / NEW * 1e3:.3f} ms/token, tau {stats.tau:.2f}, "
        f"{seconds / stats.target_forwards * 1e3:.3f} ms/forward; ms per forward by phase: {per_forward}")
profile(ar, "ar")
generator = SpeculativeGenerator(model, drafter="ngram", backend=backend)
profile(lambda: generator.generate(prompt, max_new_tokens=NEW), "ngram")
