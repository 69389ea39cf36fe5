"""The acceptance rates a calibrated model-drafter tree learns: per rank among siblings and draft-probability bin,
the share of tested nodes the target accepted (bins with >= 20 tests), after greedy generation over code prompts.

    python3 evals/scripts/calibration_table.py DRAFT [--target DIR] [--data code:20] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec import SpeculativeGenerator
from specdec.drafters.calibration import EDGES
from specdec.drafters.model import ModelDrafter
from specdec.evals.data import load_questions

parser = argparse.ArgumentParser()
parser.add_argument("draft")
parser.add_argument("--target", default=os.path.expanduser("~/.cache/specdec/models/cpu-tiny"))
parser.add_argument("--data", default="code:20")
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--controller", default="static:max_depth=7,max_nodes=15")
args = parser.parse_args()

target = AutoModelForCausalLM.from_pretrained(args.target).eval()
drafter = ModelDrafter(path=args.draft, mode="tree")
generator = SpeculativeGenerator(target, tokenizer=AutoTokenizer.from_pretrained(args.target), drafter=drafter,
                                 controller=args.controller)
for question in load_questions(args.data):
    generator.generate(question.turns[0], max_new_tokens=args.max_new_tokens)
calibration, lows, highs = drafter.calibration, (0.0,) + EDGES, EDGES + (1.0,)
for rank in range(3):
    cells = [f"p in ({lows[b]:.2f}, {highs[b]:.2f}]: {calibration.accepted[rank, b] / calibration.tested[rank, b]:.2f} "
             f"of {int(calibration.tested[rank, b])}" for b in range(len(lows)) if calibration.tested[rank, b] >= 20]
    print(f"rank {rank}: " + "; ".join(cells))
