"""Write a corpus of a chat model's own answers (greedy, batched) to generic instructions that are not Spec-Bench's:
the training text of an early-exit head that learns to predict what the target itself writes.
    python3 evals/scripts/self_text.py TARGET OUT.txt [N_PROMPTS] [NEW_TOKENS]"""

import itertools
import sys

import torch

from specdec.models import load_model

TASKS = ["Explain {} to a child.", "Write a short story about {}.", "List five facts about {}.",
         "Give three tips about {}.", "Write a haiku about {}.", "What are the pros and cons of {}?",
         "Describe the history of {} in a paragraph.", "Write a Python function related to {}."]
TOPICS = ["the ocean", "volcanoes", "bread baking", "chess", "electric cars", "the moon", "gardening", "sleep",
          "bicycles", "rainforests", "coffee", "music theory", "recycling", "birds", "mountains", "friendship",
          "time management", "the internet", "robots", "winter", "trains", "honey bees", "libraries", "football",
          "clouds", "solar panels", "dinosaurs", "cooking rice", "painting", "the stock market", "deserts", "jazz"]


def main(target: str, out: str, count: int = 256, new_tokens: int = 192) -> None:
    model, tokenizer, note = load_model(target)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompts = [task.format(topic) for task, topic in itertools.product(TASKS, TOPICS)][:count]
    texts = []
    for start in range(0, len(prompts), 64):
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts[start:start + 64]]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        texts += [c + tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
                  for c, row in zip(chats, ids)]
    open(out, "w").write("\n\n".join(texts))
    print(f"{len(texts)} answers of {target} ({note}), {sum(map(len, texts)) / 1e6:.2f}M chars -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
