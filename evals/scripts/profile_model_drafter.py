"""What a model drafter's greedy chain costs on the native backend, per draft depth, with each depth read back to
the host (`ModelDrafter.device_chain = False`, `_grow`'s loop) and as one CUDA graph that feeds each step's top token
to the next on the device (`_greedy_chain`, `GraphBackend.greedy_chain`). Random-init models of the zoo target's
shape and of `specdec train distill --preset gpu-small`'s draft (2 layers, hidden 512) in bf16: timing does not
depend on weight values, and with a static budget the chain is drafted to its full depth whatever is accepted.

    python3 evals/scripts/profile_model_drafter.py [OUT_FILE]
"""

import torch
from host_timing import say, timed  # evals/scripts/host_timing.py
from transformers import LlamaConfig, LlamaForCausalLM

from specdec import SpeculativeGenerator
from specdec.backends.native import NativeBackend
from specdec.drafters.model import ModelDrafter
from specdec.evals.step_bench import build_model
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule

NEW, DEPTH = 128, 7
target = build_model("zoo", "sdpa", "cuda", torch.bfloat16)
target.generation_config.eos_token_id = None
draft = LlamaForCausalLM(LlamaConfig(
    vocab_size=target.config.vocab_size, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=False,
)).to("cuda", torch.bfloat16).eval()
prompt = torch.randint(0, target.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
backend = NativeBackend(target, max_len=1024)
say(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
say(f"ar: {timed(lambda: reference_decode(backend, prompt, SamplingParams(), StopRule(NEW))) / NEW * 1e3:.3f} "
    f"ms/token")
outputs = {}
for device_chain in (False, True, False, True):
    drafter = ModelDrafter(draft, mode="chain", graphs=True)
    drafter.device_chain = device_chain
    generator = SpeculativeGenerator(target, drafter=drafter, backend=backend,
                                     controller=f"static:max_depth={DEPTH}")
    for sync in (True, False):
        generator.phase_sync = sync
        runs = []
        seconds = timed(lambda: runs.append(generator.generate(prompt, max_new_tokens=NEW)))
        stats = runs[-1].stats
        per_forward = {phase: round(s / stats.target_forwards * 1e3, 3) for phase, s in stats.seconds.items()}
        outputs.setdefault(device_chain, runs[-1].token_ids)
        say(f"chain of {DEPTH}, device_chain={device_chain}, phase_sync={sync}: {seconds / NEW * 1e3:.3f} ms/token, "
            f"tau {stats.tau:.2f}, {seconds / stats.target_forwards * 1e3:.3f} ms/forward; ms per forward by "
            f"phase: {per_forward}; draft ms per depth {per_forward.get('draft', 0) / DEPTH:.3f}")
say(f"same output both ways: {outputs[True] == outputs[False]}")
