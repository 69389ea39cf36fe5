"""Build the `retrieval` drafter's datastore for a zoo target from the training split of its corpus (the held-out
files, which the code prompts come from, are never indexed).

    python evals/scripts/zoo_datastore.py PRESET OUT_PATH [MAX_CHARS]
"""

import sys
import time

from transformers import AutoTokenizer

from specdec.drafters.retrieval import build_from_texts
from specdec.train.pretrain import PRESETS, ensure_model, python_sources, read_texts, split_files

preset, out_path = sys.argv[1], sys.argv[2]
max_chars = int(sys.argv[3]) if len(sys.argv) > 3 else 30_000_000
model_dir = ensure_model(preset)
train_files, _ = split_files(python_sources(), PRESETS[preset].held_out_every)
start = time.perf_counter()
texts = read_texts(train_files, max_chars)
path = build_from_texts(AutoTokenizer.from_pretrained(model_dir), texts, out_path, vocab_size=PRESETS[preset].vocab_size)
print(f"datastore {path}: {len(texts)} training files, {sum(map(len, texts)):,} chars, "
      f"{time.perf_counter() - start:.0f} s")
