"""The default target: a small Llama + byte-level BPE tokenizer trained on this environment's Python sources.

No machine here reaches the Hugging Face Hub, yet `specdec generate` and the benchmarks need a target with real
weights and real structure. This module trains one from local text: the `.py` files of site-packages and the
stdlib, split by file. One file in `held_out_every` is held out — never seen by the tokenizer or the model — and
gives the held-out loss and the code-completion prompts (`heldout_code_prompts`).

Terms:
- split key: a file's path relative to its root (posix); its sha1 decides train / held-out and the order in
  which files are read, so both are the same on every machine and in every process (never the salted `hash()`).
- stream: files' token ids, each file followed by EOS, concatenated; a chunk is a (seq_len,) slice of it and a
  batch is (batch_size, seq_len) chunks drawn with a `torch.Generator` seeded from the config.
- budget: training stops at `train_seconds` of wall clock or at `max_steps`, whichever comes first; the LR
  schedule (linear warmup, then cosine to 10%) runs over the fraction of the budget spent.
- cache: `default_model_dir(preset)`. A dir counts as built only if `specdec_pretrain.json` is in it and records
  the preset's current config; builds are written into a temp dir beside it and renamed into place.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import sysconfig
import time
import tokenize
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from specdec.models import cache_root

METADATA_FILE = "specdec_pretrain.json"
EOS, BOS, PAD = "<|endoftext|>", "<|startoftext|>", "<|pad|>"
MIN_FILE_BYTES, MAX_FILE_BYTES = 500, 200_000


@dataclass(frozen=True)
class PretrainConfig:
    """Model shape, data and optimisation of one pretraining run. A new preset is a new `PRESETS` entry."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads: grouped-query attention
    intermediate_size: int  # SwiGLU MLP width
    context_length: int  # max_position_embeddings of the saved model
    seq_len: int  # training chunk length (<= context_length)
    batch_size: int
    train_seconds: float | None  # wall-clock budget; None = max_steps only
    max_steps: int | None  # None = train_seconds only
    lr: float
    warmup_steps: int
    weight_decay: float
    max_corpus_chars: int  # training text read (files in split-key order until this many chars)
    tokenizer_chars: int  # the first this many of those chars train the BPE tokenizer
    eval_chunks: int = 64  # held-out chunks for the final held-out loss
    held_out_every: int = 50
    seed: int = 0
    dtype: str = "float32"  # saved weights; also the autocast dtype on CUDA when not float32

    def __post_init__(self) -> None:
        if self.train_seconds is None and self.max_steps is None:
            raise ValueError("PretrainConfig needs a budget: set train_seconds, max_steps or both")
        if self.seq_len > self.context_length:
            raise ValueError(f"seq_len {self.seq_len} > context_length {self.context_length}; lower seq_len")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size}, num_heads {self.num_heads}, num_kv_heads {self.num_kv_heads}: "
                "heads must divide hidden_size and kv heads must divide heads"
            )


PRESETS: dict[str, PretrainConfig] = {
    # The default model of `specdec generate`: 1.3M parameters (0.5M of them the tied embedding), head dim 64.
    # max_steps decides: 1,700 steps take ~3 min on 2 free CPU cores (~9.5k tokens/s). train_seconds only caps
    # a busy machine, where the model comes out weaker.
    # Sized by compute: at ~1e13 FLOPs, models of 1-1.5M params beat 0.3-0.6M and 2-4M ones in held-out
    # nats/char (1.48-1.52 vs 1.59-1.81), batch 4x256 beat 8x256 and 16x256, lr 2e-3 beat 1e-3 and 3e-3.
    "cpu-tiny": PretrainConfig(
        vocab_size=4096, hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=384,
        context_length=1024, seq_len=256, batch_size=4, train_seconds=240.0, max_steps=1700,
        lr=2e-3, warmup_steps=100, weight_decay=0.1, max_corpus_chars=12_000_000, tokenizer_chars=3_000_000,
    ),
    # The GPU benchmark target (`specdec bench --target zoo:gpu-100m`): 107M parameters, 4 min of training on one
    # H100 (bf16 autocast, torch.compile); the whole build, corpus and tokenizer included, about 7 min.
    "gpu-100m": PretrainConfig(
        vocab_size=8192, hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=4, intermediate_size=2048,
        context_length=2048, seq_len=1024, batch_size=48, train_seconds=240.0, max_steps=None,
        lr=1e-3, warmup_steps=200, weight_decay=0.1, max_corpus_chars=120_000_000, tokenizer_chars=20_000_000,
        dtype="bfloat16",
    ),
    # Seconds, for tests.
    "test-micro": PretrainConfig(
        vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
        context_length=128, seq_len=32, batch_size=4, train_seconds=None, max_steps=12,
        lr=3e-3, warmup_steps=2, weight_decay=0.1, max_corpus_chars=200_000, tokenizer_chars=100_000,
        eval_chunks=8,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- cache


def default_model_dir(preset: str = "cpu-tiny") -> Path:
    return cache_root() / "models" / preset


def _preset_config(preset: str) -> PretrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown pretrain preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def is_built(model_dir: Path, config: PretrainConfig) -> bool:
    """A cache dir counts only with its metadata file, recording this very config (a changed preset rebuilds)."""
    metadata_path = Path(model_dir) / METADATA_FILE
    if not metadata_path.is_file():
        return False
    return json.loads(metadata_path.read_text())["config"] == dataclasses.asdict(config)


def ensure_model(preset: str = "cpu-tiny", progress: bool = True) -> Path:
    """The cached model dir of `preset`, built first (with a one-line notice and a progress bar) if missing."""
    config = _preset_config(preset)
    model_dir = default_model_dir(preset)
    if is_built(model_dir, config):
        return model_dir
    if progress:
        notice = f"specdec: building the {preset!r} model ({describe(config)}, cached in {model_dir})"
        Console(stderr=True).print(notice)
    return pretrain(config, model_dir, progress=progress)


def describe(config: PretrainConfig) -> str:
    """E.g. 'a 1.3M-parameter Llama trained on this environment's Python sources, at most ~5 min on CPU'."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(_llama_config(config)).parameters())
    size = f"{n_params / 1e6:.1f}M" if n_params >= 1e5 else f"{n_params / 1e3:.0f}K"
    if config.train_seconds is None:
        budget = f"{config.max_steps:,} steps"
    else:  # + ~30 s for the corpus, the tokenizer and saving
        device = "GPU" if torch.cuda.is_available() else "CPU"
        budget = f"at most ~{math.ceil((config.train_seconds + 30) / 60)} min on {device}"
    return f"a {size}-parameter Llama trained on this environment's Python sources, {budget}"


# --------------------------------------------------------------------------------------------------- corpus


def default_roots() -> list[Path]:
    """site-packages and the stdlib of the running interpreter (site-packages may lie inside the stdlib)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[name]) for name in ("purelib", "stdlib")))


def python_sources(roots: list[Path] | None = None) -> list[Path]:
    """Sorted, de-duplicated `.py` files of MIN_FILE_BYTES .. MAX_FILE_BYTES under `roots` (default: default_roots)."""
    found = set()
    for root in roots or default_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                path = Path(dirpath, name)
                if name.endswith(".py") and MIN_FILE_BYTES <= _size(path) <= MAX_FILE_BYTES:
                    found.add(path)
    return sorted(found)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # a dangling link
        return -1


def split_key(path: Path, roots: list[Path] | None = None) -> str:
    """The path relative to the deepest root that holds it, as posix text: the same on every machine."""
    holders = [Path(root) for root in roots or default_roots() if Path(path).is_relative_to(root)]
    if not holders:
        return Path(path).as_posix()
    return Path(path).relative_to(max(holders, key=lambda root: len(root.parts))).as_posix()


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def split_files(
    files: list[Path], held_out_every: int, roots: list[Path] | None = None
) -> tuple[list[Path], list[Path]]:
    """(train, held_out): a file is held out iff sha1(split key) % held_out_every == 0. Both lists come in
    split-key-hash order, which mixes packages, so reading "the first N chars" samples the whole environment."""
    hashes = {path: _key_hash(split_key(path, roots)) for path in files}
    ordered = sorted(files, key=lambda path: (hashes[path], str(path)))
    held_out = [path for path in ordered if hashes[path] % held_out_every == 0]
    train = [path for path in ordered if hashes[path] % held_out_every != 0]
    return train, held_out


def iter_texts(files: list[Path]) -> typing.Iterator[str]:
    """Texts of `files` in order; files that are not UTF-8 (or not readable) are skipped."""
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def read_texts(files: list[Path], max_chars: int) -> list[str]:
    """`iter_texts(files)` until they hold `max_chars` characters in all."""
    texts, total = [], 0
    for text in iter_texts(files):
        if total >= max_chars:
            break
        texts.append(text)
        total += len(text)
    return texts


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, context_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: lossless on any text, whitespace kept) with EOS/BOS/PAD special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        bos_token=BOS,
        pad_token=PAD,
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
    )


def pack_chunks(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """(n_chunks, seq_len) int64: the texts' ids, each followed by EOS, cut into whole chunks (the tail dropped)."""
    eos_id = tokenizer.eos_token_id
    encodings = tokenizer.backend_tokenizer.encode_batch(texts)
    stream = [token for encoding in encodings for token in encoding.ids + [eos_id]]
    n_chunks = len(stream) // seq_len
    return torch.tensor(stream[: n_chunks * seq_len], dtype=torch.long).view(n_chunks, seq_len)


# ---------------------------------------------------------------------------------------------------- model


def _llama_config(config: PretrainConfig, tokenizer: PreTrainedTokenizerFast | None = None) -> LlamaConfig:
    special_ids = {}
    if tokenizer is not None:
        special_ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.context_length,
        tie_word_embeddings=True,
        **special_ids,
    )


def make_optimizer(model: torch.nn.Module, config, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms). `config`: any config with lr and weight_decay (the
    pretraining and distillation configs share this, `budget_fraction` and `learning_rate`)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused)


def budget_fraction(config, step: int, elapsed_s: float) -> float:
    """How much of the budget is spent, 0..>=1: the larger of steps / max_steps and seconds / train_seconds."""
    by_steps = step / config.max_steps if config.max_steps else 0.0
    by_time = elapsed_s / config.train_seconds if config.train_seconds else 0.0
    return max(by_steps, by_time)


def learning_rate(config, step: int, fraction: float) -> float:
    """Linear warmup over warmup_steps, times a cosine from lr down to lr/10 over the budget fraction."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))
    return config.lr * warmup * (0.1 + 0.9 * cosine)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    train_loss: float  # exponential moving average (0.95) of the logged batch losses
    train_seconds: float
    tokens_per_second: float


def train(
    model: torch.nn.Module, chunks: torch.Tensor, config: PretrainConfig, progress: Progress | None
) -> TrainResult:
    """Next-token training on random (batch_size, seq_len) batches of `chunks` until the budget is spent."""
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    step_model = torch.compile(model) if on_cuda else model
    low_precision = on_cuda and config.dtype != "float32"
    autocast = torch.autocast(device.type, dtype=getattr(torch, config.dtype), enabled=low_precision)
    optimizer = make_optimizer(model, config, fused=on_cuda)
    generator = torch.Generator().manual_seed(config.seed)
    task = progress.add_task("training", total=1.0, step=0, loss=float("nan"), tok_s=0.0) if progress else None
    log_every = 10 if on_cuda else 1  # loss.item() waits for the GPU: not every step there
    model.train()
    start, step, ema_loss = time.perf_counter(), 0, None
    while (fraction := budget_fraction(config, step, time.perf_counter() - start)) < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, fraction)
        batch = chunks[torch.randint(len(chunks), (config.batch_size,), generator=generator)].to(device)
        with autocast:
            loss = step_model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % log_every == 0 or step == 1:
            ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
            if progress is not None:
                tok_s = step * config.batch_size * config.seq_len / (time.perf_counter() - start)
                progress.update(task, completed=fraction, step=step, loss=ema_loss, tok_s=tok_s)
    seconds = time.perf_counter() - start
    return TrainResult(step, ema_loss, seconds, step * config.batch_size * config.seq_len / seconds)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int) -> float | None:
    """Mean next-token loss over (n, seq_len) chunks; None when there are none."""
    if len(chunks) == 0:
        return None
    device = next(model.parameters()).device
    model.eval()
    batches = [batch.to(device) for batch in chunks.split(batch_size)]
    losses = [model(input_ids=batch, labels=batch).loss.item() for batch in batches]
    model.train()
    return sum(losses) / len(losses)


# -------------------------------------------------------------------------------------------------- pretrain


@dataclass(frozen=True)
class Corpus:
    tokenizer: PreTrainedTokenizerFast
    train_chunks: torch.Tensor  # (n, seq_len) int64
    held_out_chunks: torch.Tensor  # (<= eval_chunks, seq_len) int64
    stats: dict[str, int]  # files / chars / tokens, for the metadata file


def build_corpus(config: PretrainConfig, roots: list[Path] | None) -> Corpus:
    """Split the sources, train the tokenizer on training text only, and pack both sides into chunks."""
    train_files, held_out_files = split_files(python_sources(roots), config.held_out_every, roots)
    train_texts = read_texts(train_files, config.max_corpus_chars)
    if not train_texts:
        raise ValueError(f"no training files under {roots or default_roots()}: need .py files of 500 B - 200 KB")
    tokenizer_texts = read_texts(train_files, config.tokenizer_chars)
    tokenizer = train_tokenizer(tokenizer_texts, config.vocab_size, config.context_length)
    held_out_texts = read_texts(held_out_files, config.max_corpus_chars // config.held_out_every)
    train_chunks = pack_chunks(train_texts, tokenizer, config.seq_len)
    held_out_chunks = pack_chunks(held_out_texts, tokenizer, config.seq_len)[: config.eval_chunks]
    stats = {
        "source_files": len(train_files) + len(held_out_files), "held_out_files": len(held_out_files),
        "train_files_read": len(train_texts), "train_chars": sum(map(len, train_texts)),
        "train_tokens": train_chunks.numel(), "held_out_tokens": held_out_chunks.numel(),
    }  # fmt: skip
    return Corpus(tokenizer, train_chunks, held_out_chunks, stats)


def pretrain(config: PretrainConfig, out_dir: Path, roots: list[Path] | None = None, progress: bool = True) -> Path:
    """Train tokenizer + model on the Python sources under `roots` (default: this environment's) and save both
    to `out_dir`, atomically, with `specdec_pretrain.json`. Trains on CUDA when available, else on the
    `free_cores()` of the CPU."""
    out_dir, begin = Path(out_dir), time.perf_counter()
    console = Console(stderr=True, quiet=not progress)
    threads, train_threads = torch.get_num_threads(), free_cores()
    torch.set_num_threads(train_threads)
    try:
        corpus = build_corpus(config, roots)
        console.print("  corpus: " + ", ".join(f"{name.replace('_', ' ')} {n:,}" for name, n in corpus.stats.items()))
        torch.manual_seed(config.seed)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = LlamaForCausalLM(_llama_config(config, corpus.tokenizer)).to(device)
        with _training_progress(progress) as bar:
            result = train(model, corpus.train_chunks, config, bar)
        held_out_loss = mean_loss(model, corpus.held_out_chunks, config.batch_size)
    finally:
        torch.set_num_threads(threads)
    console.print(f"  {result.steps:,} steps in {result.train_seconds:.0f} s: train loss {result.train_loss:.3f}, "
                  f"held-out loss {held_out_loss if held_out_loss is None else round(held_out_loss, 3)}")  # fmt: skip
    metadata = {
        "preset": next((name for name, preset in PRESETS.items() if preset == config), None),
        "config": dataclasses.asdict(config),
        "corpus": corpus.stats,
        "parameters": sum(p.numel() for p in model.parameters()),
        "cpu_threads": train_threads,
        **dataclasses.asdict(result),
        "held_out_loss": held_out_loss,
        "build_seconds": time.perf_counter() - begin,
    }
    _save_atomically(out_dir, model.to(getattr(torch, config.dtype)), corpus.tokenizer, metadata)
    console.print(f"  saved to {out_dir}")
    return out_dir


def free_cores() -> int:
    """Cores this process may use, but no more than the machine's cores minus its 1-minute load average; >= 1.

    More torch threads than free cores is far worse than fewer: OpenMP threads wait on each other. Measured on
    2 cores under a load of 8: 1 thread 1.9k tokens/s, 2 threads 0.27k."""
    machine_cores = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine_cores
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(allowed, machine_cores - busy))


def _training_progress(enabled: bool) -> Progress:
    columns = [
        TextColumn("  {task.description}"),
        BarColumn(),
        TextColumn("step {task.fields[step]:,}  loss {task.fields[loss]:.3f}  {task.fields[tok_s]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> typing.Iterator[Path]:
    """Yield a temp dir beside `out_dir` to write into; on success rename it into place (replacing an older
    `out_dir`), so an interrupted save never leaves a half-written directory. HF's shard-writing bar is hidden."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.saving-{uuid.uuid4().hex[:8]}"
    stale = out_dir.parent / f".{out_dir.name}.stale-{uuid.uuid4().hex[:8]}"
    shard_bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        staging.mkdir()
        yield staging
        if out_dir.exists():
            out_dir.rename(stale)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
        if shard_bar_was_on:
            transformers_logging.enable_progress_bar()


def _save_atomically(
    out_dir: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, metadata: dict
) -> None:
    with staged_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------- prompts


def heldout_code_prompts(
    n: int, max_lines: int = 40, roots: list[Path] | None = None, held_out_every: int = 50
) -> list[str]:
    """Up to `n` code-completion prompts from held-out files, in split-key-hash order (deterministic, mixed).

    A prompt is the head of a file up to and including its first function signature and that function's
    docstring, when those end within `max_lines` lines; else the file's first `max_lines` lines."""
    _, held_out_files = split_files(python_sources(roots), held_out_every, roots)
    return [completion_prompt(source, max_lines) for source in itertools.islice(iter_texts(held_out_files), n)]


def completion_prompt(source: str, max_lines: int) -> str:
    """See `heldout_code_prompts`; always ends with a newline."""
    lines = source.splitlines(keepends=True)
    end_line = _first_function_head_end(source)
    head = lines[: end_line if end_line is not None and end_line <= max_lines else max_lines]
    return "".join(head).rstrip("\n") + "\n"


def _first_function_head_end(source: str) -> int | None:
    """1-based last line of the first function's signature + docstring; None without a (parsable) function."""
    try:
        nodes = list(ast.walk(ast.parse(source)))
        functions = [node for node in nodes if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    except (SyntaxError, ValueError):
        return None
    if not functions:
        return None
    first = min(functions, key=lambda node: node.lineno)
    if ast.get_docstring(first, clean=False) is not None:
        return first.body[0].end_lineno
    return _signature_colon_line(source, first.lineno)


def _signature_colon_line(source: str, def_line: int) -> int:
    """1-based line of the ':' that closes the signature starting at `def_line` (the first ':' outside brackets)."""
    lines = source.splitlines(keepends=True)[def_line - 1 :]
    depth = 0
    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        elif token.type == tokenize.OP and token.string == ":" and depth == 0:
            return def_line + token.start[0] - 1
    return def_line


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    """`python -m specdec.train.pretrain --preset cpu-tiny --out DIR [--root DIR ...] [--<field> VALUE ...]`"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, help="output dir (default: the cache dir of the preset)")
    parser.add_argument("--root", type=Path, action="append", help="source root (repeatable; default: the stdlib "
                        "and site-packages of this interpreter)")  # fmt: skip
    hints = typing.get_type_hints(PretrainConfig)
    for field in dataclasses.fields(PretrainConfig):
        value_type = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=value_type, help="overrides the preset")
    args = parser.parse_args(argv)
    overrides = {field.name: getattr(args, field.name) for field in dataclasses.fields(PretrainConfig)}
    config = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    out_dir = args.out or default_model_dir(args.preset)
    Console(stderr=True).print(f"specdec: building {describe(config)} into {out_dir}")
    pretrain(config, out_dir, roots=args.root)


if __name__ == "__main__":
    main()
