"""FastDraft-style offline distillation of a small drafter from the target, on accelerate.

    python -m specdec.train.distill --target DIR --draft cpu-test --data texts/ --out draft/   # a new small Llama
    specdec train distill --target DIR --draft path/to/draft --preset gpu-small --data zoo --out draft/
    accelerate launch -m specdec.train.distill ...                                          # several GPUs

Terms:
- prompt: a window of at most `prompt_tokens` tokens of a training text; held-out prompts come from held-out texts
  (every 10th text, or the held-out files of `specdec.train.pretrain` for `--data zoo`).
- sequence: a prompt + the target's continuation of it (`gen_tokens` tokens, greedy or sampled, cut after EOS),
  at most `seq_len` tokens. Sequences are generated once and saved with the checkpoint (`distill_data.safetensors`).
- teacher signal: the target's logits over a batch of sequences, computed on the fly (no logit cache).
- loss kinds (`LOSSES`, per real token, averaged): fkl = KL(target || draft) (default), rkl = KL(draft || target),
  jsd = Jensen-Shannon, topk = KL(target || draft) with both renormalised over the target's top-`topk` tokens.
  Both distributions are softmax(logits / `temperature`).
- data order: batch k holds positions k*B .. k*B+B-1 of the endless stream perm_0 ++ perm_1 ++ ..., perm_e a
  permutation seeded by (seed, e): a function of k alone, so a resumed run reads the batches it would have read.
- schedule: linear warmup, then cosine to lr/10 over the budget (the larger of step / max_steps and seconds /
  train_seconds); the scheduler's state is the step (and seconds spent), saved in `specdec_distill.json`.
- checkpoint (`--out DIR`): the draft (`save_pretrained`, safetensors) + the target's tokenizer, so `model:path=DIR`
  and `AutoModelForCausalLM.from_pretrained(DIR)` load it; `specdec_distill.json` (config, step, losses, report);
  `distill_optimizer.pt` (AdamW state: tensors, numbers and lists only, read with `weights_only=True`); the data.
  Written into a temp dir beside DIR and renamed into place every `save_every` steps and at the end.
- new draft: a Llama of the config's shape with the target's vocab size and special tokens, tied embeddings. With
  `init_from_target`, its embedding (= its tied LM head) starts as the target's input embedding when the widths
  are equal: the tokens' geometry is learnt already, and the input side's scale suits the draft's layers (a
  target with an untied, sharper LM head would feed them outsized inputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specdec.train.pretrain import budget_fraction, learning_rate, make_optimizer, staged_directory

METADATA_FILE = "specdec_distill.json"
OPTIMIZER_FILE = "distill_optimizer.pt"
DATA_FILE = "distill_data.safetensors"
HELD_OUT_EVERY = 10  # for text sources other than the zoo corpus: every 10th text is held out


# ---------------------------------------------------------------------------------------------------- losses


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, (..., V) log-probs -> (...); 0 * log 0 counts as 0."""
    return torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(draft: torch.Tensor, target: torch.Tensor, temperature: float, topk: int) -> torch.Tensor:
    return _kl(_log_probs(target, temperature), _log_probs(draft, temperature))


def reverse_kl(draft: torch.Tensor, target: torch.Tensor, temperature: float, topk: int) -> torch.Tensor:
    return _kl(_log_probs(draft, temperature), _log_probs(target, temperature))


def jensen_shannon(draft: torch.Tensor, target: torch.Tensor, temperature: float, topk: int) -> torch.Tensor:
    log_p, log_q = _log_probs(target, temperature), _log_probs(draft, temperature)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


def topk_kl(draft: torch.Tensor, target: torch.Tensor, temperature: float, topk: int) -> torch.Tensor:
    """KL(target || draft) over the target's top-k tokens, both renormalised there (what a top-k cache allows)."""
    top_target, indices = target.topk(min(topk, target.shape[-1]), dim=-1)
    return _kl(_log_probs(top_target, temperature), _log_probs(draft.gather(-1, indices), temperature))


# (draft logits (..., V), target logits (..., V), temperature, topk) -> per-token loss (...)
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]] = {
    "fkl": forward_kl, "rkl": reverse_kl, "jsd": jensen_shannon, "topk": topk_kl,
}  # fmt: skip


def distill_loss(draft: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """Mean of `config.loss` over the real tokens: (B, L, V) logits, (B, L) mask of 0/1 -> scalar."""
    per_token = LOSSES[config.loss](draft, target, config.temperature, config.topk)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass(frozen=True)
class DistillConfig:
    """Draft shape, data and optimisation of one distillation run. A new preset is a new `PRESETS` entry."""

    # the draft built when no draft path is given
    draft_layers: int
    draft_hidden: int
    draft_heads: int
    draft_kv_heads: int
    draft_intermediate: int
    # data: target-generated sequences
    num_prompts: int
    prompt_tokens: int
    gen_tokens: int  # continuation per prompt
    seq_len: int  # prompt + continuation are cut to this
    # optimisation
    batch_size: int  # per process
    max_steps: int | None  # None = train_seconds only
    train_seconds: float | None  # None = max_steps only
    lr: float
    warmup_steps: int
    weight_decay: float
    loss: str = "fkl"  # a key of LOSSES
    temperature: float = 1.0  # of both distributions in the loss
    topk: int = 32  # for loss "topk"
    draft_path: str | None = None  # an existing HF causal LM instead of a new draft
    init_from_target: bool = True
    gen_temperature: float = 0.0  # 0 = greedy continuations
    gen_batch_size: int = 8
    eval_prompts: int = 8
    eval_new_tokens: int = 32
    mixed_precision: str = "bf16"  # on CUDA; CPU trains in fp32
    save_every: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_seconds is None and self.max_steps is None:
            raise ValueError("DistillConfig needs a budget: set max_steps, train_seconds or both")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {sorted(LOSSES)}")
        if self.draft_hidden % self.draft_heads or self.draft_heads % self.draft_kv_heads:
            raise ValueError(f"draft_hidden {self.draft_hidden}, draft_heads {self.draft_heads}, draft_kv_heads "
                             f"{self.draft_kv_heads}: heads must divide hidden and kv heads must divide heads")
        if self.prompt_tokens < 1 or self.seq_len <= self.prompt_tokens:
            raise ValueError(f"need 1 <= prompt_tokens {self.prompt_tokens} < seq_len {self.seq_len}")


PRESETS: dict[str, DistillConfig] = {
    # Seconds on 2 CPU cores, for tests and smoke runs.
    "cpu-test": DistillConfig(
        draft_layers=1, draft_hidden=64, draft_heads=4, draft_kv_heads=2, draft_intermediate=128,
        num_prompts=128, prompt_tokens=8, gen_tokens=24, seq_len=32, batch_size=16, max_steps=60,
        train_seconds=None, lr=3e-3, warmup_steps=4, weight_decay=0.0, eval_prompts=12, eval_new_tokens=16,
        save_every=20,
    ),
    # A drafter for the cpu-tiny zoo target: 2 layers of its width, a few minutes on CPU.
    "cpu-small": DistillConfig(
        draft_layers=1, draft_hidden=128, draft_heads=2, draft_kv_heads=1, draft_intermediate=384,
        num_prompts=512, prompt_tokens=64, gen_tokens=64, seq_len=128, batch_size=8, max_steps=600,
        train_seconds=300.0, lr=2e-3, warmup_steps=50, weight_decay=0.0, eval_prompts=16, eval_new_tokens=64,
    ),
    # One GPU, ~10 min, for targets of ~100M-1B parameters.
    "gpu-small": DistillConfig(
        draft_layers=2, draft_hidden=512, draft_heads=8, draft_kv_heads=4, draft_intermediate=1536,
        num_prompts=8192, prompt_tokens=128, gen_tokens=256, seq_len=384, batch_size=16, max_steps=4000,
        train_seconds=600.0, lr=1e-3, warmup_steps=200, weight_decay=0.1, gen_batch_size=64, eval_prompts=32,
        eval_new_tokens=128, save_every=500,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Sequences:
    """Target-generated sequences, right-padded with 0."""

    ids: torch.Tensor  # (N, seq_len) int64
    lengths: torch.Tensor  # (N,) int64: real tokens per row
    prompt_lengths: torch.Tensor  # (N,) int64: of which the prompt

    def mask(self) -> torch.Tensor:
        """(N, seq_len) 0/1 int64: real tokens."""
        return (torch.arange(self.ids.shape[1])[None] < self.lengths[:, None]).long()


def load_texts(data: str) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) of a data source: "zoo" (the pretrain corpus split), a .jsonl with a "text"
    field, a directory of .txt/.md/.py files, or a `datasets` name (its cached "train" split, offline)."""
    source = Path(data)
    if data == "zoo":
        from specdec.train.pretrain import PRESETS as PRETRAIN_PRESETS
        from specdec.train.pretrain import iter_texts, python_sources, split_files

        train, held_out = split_files(python_sources(), PRETRAIN_PRESETS["cpu-tiny"].held_out_every)
        return list(iter_texts(train[:4096])), list(iter_texts(held_out[:256]))
    if source.is_file() and source.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in source.read_text().splitlines() if line.strip()]
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in (".txt", ".md", ".py") and p.is_file())
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    else:
        import datasets

        texts = list(datasets.load_dataset(data, split="train")["text"])
    texts = [text for text in texts if text.strip()]
    if len(texts) < 2:
        raise ValueError(f"data {data!r} gave {len(texts)} non-empty texts; need at least 2 (one is held out)")
    held_out = texts[::HELD_OUT_EVERY]
    return [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY], held_out


def prompt_windows(texts: list[str], tokenizer, n: int, config: DistillConfig, seed: int) -> list[list[int]]:
    """n prompts: texts taken in turn, each a window of <= prompt_tokens tokens at a seeded random offset."""
    rng = random.Random(seed)
    token_lists = [ids for ids in (tokenizer(text)["input_ids"] for text in texts[: max(n, 1)]) if ids]
    if not token_lists:
        raise ValueError("the data gave no tokens; check the texts and the target's tokenizer")
    prompts = []
    for i in range(n):
        ids = token_lists[i % len(token_lists)]
        start = rng.randrange(max(1, len(ids) - config.prompt_tokens))
        prompts.append(ids[start: start + config.prompt_tokens])
    return prompts


@torch.no_grad()
def continue_prompts(target, prompts: list[list[int]], config: DistillConfig, eos_id: int | None) -> Sequences:
    """The target continues each prompt (batched, left-padded; greedy or sampled) -> prompt + continuation."""
    from transformers import GenerationConfig

    sample = config.gen_temperature > 0
    generation = GenerationConfig(max_new_tokens=config.gen_tokens, do_sample=sample, pad_token_id=0,
                                  eos_token_id=eos_id, **({"temperature": config.gen_temperature, "top_k": 0}
                                                          if sample else {}))
    torch.manual_seed(config.seed)
    device = target.device
    ids = torch.zeros(len(prompts), config.seq_len, dtype=torch.long)
    lengths, prompt_lengths = [], []
    for first in range(0, len(prompts), config.gen_batch_size):
        batch = prompts[first: first + config.gen_batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = target.generate(input_ids=input_ids, attention_mask=attention, generation_config=generation)
        for row, prompt in enumerate(batch):
            continuation = out[row, width:].tolist()
            if eos_id is not None and eos_id in continuation:
                continuation = continuation[: continuation.index(eos_id) + 1]
            sequence = (prompt + continuation)[: config.seq_len]
            ids[first + row, : len(sequence)] = torch.tensor(sequence)
            lengths.append(len(sequence))
            prompt_lengths.append(len(prompt))
    return Sequences(ids, torch.tensor(lengths), torch.tensor(prompt_lengths))


class StepBatches(torch.utils.data.Sampler):
    """Batches `start` .. `stop` - 1 of the seeded endless stream (see the module docstring): resumable."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.drop_last = False
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator).tolist()
        return self._perm[position % self.n]

    def __iter__(self):
        for batch in range(self.start, self.stop):
            yield [self._index(p) for p in range(batch * self.batch_size, (batch + 1) * self.batch_size)]

    def __len__(self) -> int:
        return self.stop - self.start


def _collate(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids, mask = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    width = int(mask.sum(1).max())  # drop columns that are padding in every row
    return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}


# ----------------------------------------------------------------------------------------------------- models


def load_target(target: str | Path, device: torch.device):
    """(frozen target, tokenizer) from any source `specdec.models.resolve_model` accepts; bf16 on a GPU, else fp32."""
    from specdec.models import load_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer, _ = load_model(target, dtype, str(device))
    model.requires_grad_(False)
    return model, tokenizer


def target_vocab(target) -> int:
    return target.get_output_embeddings().weight.shape[0]


def build_draft(target, tokenizer, config: DistillConfig):
    """The draft: `config.draft_path` loaded (its vocab checked), or a new tied-embedding Llama of the config."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    vocab = target_vocab(target)
    if config.draft_path is not None:
        from specdec.models import resolve_model

        draft = AutoModelForCausalLM.from_pretrained(resolve_model(config.draft_path), dtype=torch.float32)
        draft_vocab = draft.get_output_embeddings().weight.shape[0]
        if draft_vocab != vocab:
            raise ValueError(f"draft vocab {draft_vocab} != target vocab {vocab} ({config.draft_path}); pass a "
                             f"draft built for the target's tokenizer, or a preset name to build a new one")
        return draft
    torch.manual_seed(config.seed)
    draft = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=config.draft_hidden, num_hidden_layers=config.draft_layers,
        num_attention_heads=config.draft_heads, num_key_value_heads=config.draft_kv_heads,
        intermediate_size=config.draft_intermediate, tie_word_embeddings=True,
        max_position_embeddings=max(config.seq_len, getattr(target.config, "max_position_embeddings", 0) or 0),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    embedding = target.get_input_embeddings().weight
    if config.init_from_target and embedding.shape == (vocab, config.draft_hidden):
        with torch.no_grad():
            draft.get_input_embeddings().weight.copy_(embedding.float())
    return draft


# ---------------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def agreement_and_loss(draft, target, sequences: Sequences, config: DistillConfig) -> tuple[float, float]:
    """(top-1 agreement of draft vs target over the continuation tokens, mean distill loss over real tokens)."""
    device = next(draft.parameters()).device
    agree = total = 0
    losses = []
    for rows in torch.arange(len(sequences.ids)).split(config.batch_size):
        ids, mask = sequences.ids[rows].to(device), sequences.mask()[rows].to(device)
        draft_logits = draft(input_ids=ids, attention_mask=mask).logits.float()
        target_logits = target(input_ids=ids, attention_mask=mask).logits.float()
        positions = torch.arange(ids.shape[1], device=device)[None]
        scored = mask.bool() & (positions >= sequences.prompt_lengths[rows, None].to(device) - 1)
        scored[:, -1] = False
        scored &= positions < sequences.lengths[rows, None].to(device) - 1  # predicts a generated token
        agree += int(((draft_logits.argmax(-1) == target_logits.argmax(-1)) & scored).sum())
        total += int(scored.sum())
        losses.append(float(distill_loss(draft_logits, target_logits, mask, config)))
    return agree / max(total, 1), sum(losses) / max(len(losses), 1)


def greedy_tau(draft, target, tokenizer, sequences: Sequences, config: DistillConfig) -> float:
    """Committed tokens per target forward of `SpeculativeGenerator` with this draft on the held-out prompts."""
    from specdec.drafters.model import ModelDrafter

    from specdec import SpeculativeGenerator

    generator = SpeculativeGenerator(target, tokenizer=tokenizer, drafter=ModelDrafter(draft.eval()),
                                     controller="static:max_depth=4")
    new_tokens = forwards = 0
    for ids, prompt_len in zip(sequences.ids, sequences.prompt_lengths):
        stats = generator.generate(ids[:prompt_len].tolist(), max_new_tokens=config.eval_new_tokens).stats
        new_tokens, forwards = new_tokens + stats.new_tokens, forwards + stats.target_forwards
    return new_tokens / max(forwards, 1)


def evaluate(draft, target, tokenizer, sequences: Sequences, config: DistillConfig) -> dict[str, float]:
    was_training = draft.training
    draft.eval()
    agreement, loss = agreement_and_loss(draft, target, sequences, config)
    tau = greedy_tau(draft, target, tokenizer, sequences, config)
    draft.train(was_training)
    return {"top1_agreement": agreement, "held_out_loss": loss, "tau": tau}


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class TrainState:
    """What a checkpoint records besides the tensors; `specdec_distill.json` holds it (+ the config)."""

    step: int = 0
    elapsed_s: float = 0.0
    losses: list[float] = dataclasses.field(default_factory=list)  # per step, mean over processes
    before: dict[str, float] | None = None  # evaluate() of the initial draft
    after: dict[str, float] | None = None
    complete: bool = False


def distill(config: DistillConfig, target: str | Path, data: str, out_dir: str | Path, resume: bool | None = None,
            stop_after: int | None = None, progress: bool = True) -> TrainState:
    """Distill a draft of `target` into `out_dir` (see the module docstring). resume: None = resume when out_dir
    holds a checkpoint, True = it must, False = start over. stop_after: stop (as if interrupted) once this many
    steps are done, leaving a resumable checkpoint."""
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=config.mixed_precision if cuda else "no", cpu=not cuda)
    console = Console(stderr=True, quiet=not (progress and accelerator.is_main_process))
    target_model, tokenizer = load_target(target, accelerator.device)
    checkpoint = _find_checkpoint(out_dir, config, resume)
    if checkpoint is None:
        draft = build_draft(target_model, tokenizer, config)
        train_data, eval_data = _generate_data(target_model, tokenizer, data, config, console)
        state = TrainState(before=evaluate(draft.to(accelerator.device), target_model, tokenizer, eval_data, config))
        optimizer_state = None
    else:
        draft, train_data, eval_data, state, optimizer_state = _load_checkpoint(out_dir)
        if state.complete and state.step >= _stop_step(config, stop_after):
            console.print(f"  {out_dir} holds a finished run of {state.step} steps; nothing to do")
            return state
        console.print(f"  resuming {out_dir} at step {state.step}")
    optimizer = make_optimizer(draft, config)
    stop = _stop_step(config, stop_after)
    batches = StepBatches(len(train_data.ids), config.batch_size, config.seed,
                          state.step * accelerator.num_processes, stop * accelerator.num_processes)
    dataset = torch.utils.data.TensorDataset(train_data.ids, train_data.mask())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=_collate)
    draft, optimizer, loader = accelerator.prepare(draft, optimizer, loader)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    save = _saver(accelerator, out_dir, tokenizer, config, train_data, eval_data)
    with _progress(console) as bar:
        _train(accelerator, draft, target_model, optimizer, loader, config, state, save, bar, stop)
    if state.step >= stop and stop < _stop_step(config, None):
        return state  # interrupted on purpose: the checkpoint is saved, the report waits for the real end
    state.complete = True
    if accelerator.is_main_process:
        state.after = evaluate(accelerator.unwrap_model(draft), target_model, tokenizer, eval_data, config)
        console.print(report_table(state))
    save(draft, optimizer, state)
    return state


def _stop_step(config: DistillConfig, stop_after: int | None) -> int:
    steps = config.max_steps if config.max_steps is not None else 10**9
    return steps if stop_after is None else min(steps, stop_after)


def _train(accelerator, draft, target, optimizer, loader, config, state, save, bar, stop: int) -> None:
    task = bar.add_task("distilling", total=1.0, step=state.step, loss=float("nan"))
    started = time.perf_counter() - state.elapsed_s
    draft.train()
    for batch in loader:
        fraction = budget_fraction(config, state.step, time.perf_counter() - started)
        if fraction >= 1.0 or state.step >= stop:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, state.step, fraction)
        with torch.no_grad():
            teacher = target(**batch).logits
        with accelerator.autocast():
            logits = draft(**batch).logits
        loss = distill_loss(logits, teacher, batch["attention_mask"], config)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.elapsed_s = time.perf_counter() - started
        state.losses.append(float(accelerator.gather(loss.detach()[None]).mean()))
        bar.update(task, completed=min(1.0, fraction), step=state.step, loss=state.losses[-1])
        if state.step % config.save_every == 0 or state.step >= stop:
            save(draft, optimizer, state)


def _generate_data(target, tokenizer, data: str, config: DistillConfig, console) -> tuple[Sequences, Sequences]:
    train_texts, held_out_texts = load_texts(data)
    eos_id = tokenizer.eos_token_id
    console.print(f"  the target continues {config.num_prompts} + {config.eval_prompts} held-out prompts")
    train = continue_prompts(target, prompt_windows(train_texts, tokenizer, config.num_prompts, config,
                                                    config.seed), config, eos_id)
    held_out = continue_prompts(target, prompt_windows(held_out_texts, tokenizer, config.eval_prompts, config,
                                                       config.seed + 1), config, eos_id)
    return train, held_out


# -------------------------------------------------------------------------------------------------- checkpoints


def _find_checkpoint(out_dir: Path, config: DistillConfig, resume: bool | None) -> Path | None:
    """out_dir when a run resumes from it, else None; a checkpoint of another config is refused."""
    metadata_path = out_dir / METADATA_FILE
    if resume is False or (resume is None and not metadata_path.exists()):
        return None
    if not metadata_path.exists():
        raise ValueError(f"--resume: no checkpoint in {out_dir} ({METADATA_FILE} is missing)")
    saved = _read_metadata(out_dir)["config"]
    budget = {"max_steps", "train_seconds", "save_every", "eval_prompts", "eval_new_tokens"}
    mismatched = sorted(k for k, v in dataclasses.asdict(config).items() if k not in budget and saved.get(k) != v)
    if mismatched:
        raise ValueError(f"the checkpoint in {out_dir} was trained with another config ({', '.join(mismatched)} "
                         f"differ); pass the same settings, or --no-resume to start over")
    return out_dir


def _read_metadata(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / METADATA_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"the checkpoint in {out_dir} is unreadable ({METADATA_FILE}: {error}); "
                         f"delete it or pass --no-resume") from error


def _load_checkpoint(out_dir: Path):
    """(draft, train data, held-out data, state, optimizer state) of a checkpoint; ValueError if any file is bad."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    metadata = _read_metadata(out_dir)
    try:
        draft = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        tensors = load_file(out_dir / DATA_FILE)
        optimizer_state = torch.load(out_dir / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
    except Exception as error:  # safetensors, pickle and OS errors alike: the checkpoint cannot be used
        raise ValueError(f"the checkpoint in {out_dir} is unreadable ({type(error).__name__}: {error}); "
                         f"delete it or pass --no-resume") from error
    train, held_out = (Sequences(*(tensors[f"{split}.{name}"] for name in ("ids", "lengths", "prompt_lengths")))
                       for split in ("train", "held_out"))
    state = TrainState(**{k: metadata[k] for k in ("step", "elapsed_s", "losses", "before", "after", "complete")})
    return draft, train, held_out, state, optimizer_state


def _saver(accelerator, out_dir: Path, tokenizer, config: DistillConfig, train: Sequences, held_out: Sequences):
    def save(draft, optimizer, state: TrainState) -> None:
        accelerator.wait_for_everyone()
        optimizer_state = optimizer.state_dict()  # collective under some distributed setups: on every process
        if accelerator.is_main_process:
            metadata = {"config": dataclasses.asdict(config), **dataclasses.asdict(state)}
            _save_atomically(out_dir, accelerator.unwrap_model(draft), tokenizer, metadata, optimizer_state,
                             {f"{split}.{name}": getattr(data, name).contiguous()
                              for split, data in (("train", train), ("held_out", held_out))
                              for name in ("ids", "lengths", "prompt_lengths")})
        accelerator.wait_for_everyone()

    return save


def _save_atomically(out_dir: Path, draft, tokenizer, metadata: dict, optimizer_state: dict,
                     data: dict[str, torch.Tensor]) -> None:
    """Write into a temp dir beside `out_dir`, then rename it into place (replacing the previous checkpoint)."""
    from safetensors.torch import save_file

    with staged_directory(out_dir) as staging:
        draft.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        save_file(data, staging / DATA_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------------ output


def report_table(state: TrainState) -> Table:
    """Acceptance before/after distillation, on the held-out prompts."""
    table = Table(title=f"acceptance before/after distillation ({state.step} steps)")
    for column in ("held-out metric", "before", "after"):
        table.add_column(column, justify="left" if column == "held-out metric" else "right")
    labels = {"tau": "greedy τ (static:max_depth=4)", "top1_agreement": "top-1 agreement with the target",
              "held_out_loss": "distillation loss"}
    for key, label in labels.items():
        cells = [f"{(values or {}).get(key, float('nan')):.3f}" for values in (state.before, state.after)]
        table.add_row(label, *cells)
    return table


def _progress(console: Console) -> Progress:
    columns = [TextColumn("  {task.description}"), BarColumn(),
               TextColumn("step {task.fields[step]:,}  loss {task.fields[loss]:.4f}"), TimeElapsedColumn()]
    return Progress(*columns, console=console, disable=console.quiet)


# --------------------------------------------------------------------------------------------------------- CLI


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    """`distill` under a `train` subparsers object; its fields override the preset."""
    parser = subparsers.add_parser("distill", help="distill a small drafter from the target (FastDraft)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True,
                        help="the target: a catalogue name, a .gguf file, zoo:<preset>, an HF folder or id")
    parser.add_argument("--draft", default="cpu-test", help=f"a draft model dir, or a preset to build a new draft "
                        f"from ({', '.join(PRESETS)})")  # fmt: skip
    parser.add_argument("--preset", choices=sorted(PRESETS), help="config preset when --draft is a path")
    parser.add_argument("--data", required=True, help="zoo | a .jsonl with a 'text' field | a dir of .txt/.md/.py "
                        "| a cached `datasets` name")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="checkpoint dir (resumed when it holds one)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="--resume: the checkpoint must exist; --no-resume: start over (default: resume if any)")
    parser.add_argument("--stop-after", type=int, help="stop after this many steps in all, leaving a checkpoint")
    parser.add_argument("--quiet", action="store_true")
    hints = typing.get_type_hints(DistillConfig)
    for field in dataclasses.fields(DistillConfig):
        if field.name == "draft_path":
            continue
        value_type = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
        kwargs = {"choices": sorted(LOSSES)} if field.name == "loss" else {}
        if value_type is bool:
            parser.add_argument(f"--{field.name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                help="overrides the preset")
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=value_type, help="overrides the preset",
                                **kwargs)
    parser.set_defaults(run=distill_command)
    return parser


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    draft_is_preset = args.draft in PRESETS
    preset = args.draft if draft_is_preset else (args.preset or "cpu-test")
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(DistillConfig)}
    overrides["draft_path"] = None if draft_is_preset else args.draft
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def distill_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    distill(config, args.target, args.data, args.out, resume=args.resume, stop_after=args.stop_after,
            progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m specdec.train.distill --target T --draft D_or_preset --data ... --out DIR [...]`"""
    parser = argparse.ArgumentParser(prog="specdec.train.distill")
    add_distill_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
