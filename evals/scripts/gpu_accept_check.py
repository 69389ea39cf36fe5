"""GPU: the greedy acceptance graphs are captured up front with the step graphs (`GraphBackend.capture_all`), and
greedy generation through them equals AR on HF (float32 random-init Llama, graph and native backends).

    python3 evals/scripts/gpu_accept_check.py
"""

import random
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec import SpeculativeGenerator
from specdec.backends.graph import GraphBackend
from specdec.backends.hf import HFBackend
from specdec.backends.native import NativeBackend
from specdec.drafters.model import ModelDrafter
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule

config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                     initializer_range=0.1, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to("cuda").float().eval()
model.generation_config.eos_token_id = None
failures = 0
for name, backend in (("graph", GraphBackend(model)), ("native", NativeBackend(model))):
    rng = random.Random(1)
    motif = [rng.randrange(4096) for _ in range(30)]
    prompt = (motif * 12)[:300]  # ngram finds the motif: long accepted paths and branches
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(200))
    state = backend.prefill(prompt[:-1])
    ready = sorted(size for (size, width), step in backend._steps.items()
                   if step.acceptance is not None and step.acceptance.graph is not None)
    drafter = ModelDrafter(model, mode="tree", graphs=True)  # self-drafting: long accepted paths, side branches
    out = SpeculativeGenerator(model, drafter=drafter, backend=backend).generate(prompt, max_new_tokens=200)
    ok = out.token_ids == truth and ready == list(backend.buckets)
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name}: acceptance graphs captured before any verification for buckets "
          f"{ready}; self-drafting tree == AR on HF ({out.token_ids == truth}), tau {out.stats.tau:.2f}", flush=True)
sys.exit(1 if failures else 0)
