"""The SpecDec++ acceptance head: train, evaluate, save, load.

An **acceptance head** maps the draft model's last hidden state at the position that drafted a token (the row
whose logits gave the token's distribution q: `output_hidden_states[-1]`, what the LM head reads) to the chance
that the target accepts that token, given that its path so far was accepted. The `acceptance_head` controller
stops a draft once the chance of any rejection, 1 - Π p, passes a threshold.

Head: `layers` residual blocks x + silu(W x + b) (W zero-initialised, each block its own weights), then a linear
map to one logit. A head file is safetensors with a JSON `AcceptanceHeadConfig` in its metadata (the draft's
shape and checksum); loading checks it and never unpickles.

**Data** (teacher forcing): token sequences of given text, or of text the target continued greedily
(`generate`), run once through the draft and once through the target. At every position t the draft's token
x = argmax q_t (and, with `sampled`, a token drawn from q_t) gets a label:
    greedy  1[x == argmax p_t]            what greedy verification accepts (specdec's benchmarks verify greedily)
    ratio   min(1, p_t(x) / q_t(x))       the acceptance chance of rejection sampling (a soft label)
Conditioned on the draft's path being accepted so far, its context is the target's own text: what teacher
forcing feeds. Held-out rows come from held-out sequences (every 10th, at least one).

**Loss**: weighted BCE, the rejected class weighted by w (SpecDec++: 6, so rejections are not drowned):
    -(y log s(z) + w (1 - y) log(1 - s(z)))
Its minimiser is z = log(y / (w (1 - y))): the odds shrunk by w. The head's `probability` adds log w back, so
its probabilities are calibrated (what the held-out ECE measures and the controller's cost rule needs); w only
changes where the head spends its capacity.

    examples = acceptance_examples(draft, target, token_stream(texts, tokenizer, 256))
    result = train_acceptance_head(examples, AcceptanceHeadConfig.for_draft(draft), TrainConfig(steps=500))
    result.head.save("head.safetensors");  head = AcceptanceHead.load("head.safetensors", draft=draft)
    specdec train acceptance-head --target T --draft D --data FILE_OR_DIR --out head.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

METADATA_KEY = "specdec_acceptance_head"
TRAIN_KEY = "specdec_acceptance_head_training"
LABELS = ("greedy", "ratio")
HELD_OUT_EVERY = 10
TRAIN_COMMAND = "specdec train acceptance-head"


@dataclass(frozen=True)
class AcceptanceHeadConfig:
    """hidden_size / vocab_size / num_layers / model_type / draft_name / draft_checksum: the draft's (its
    `weights_checksum`); layers: residual blocks; weight: the rejected class's weight in training (undone by
    `probability`); label: what it learnt (`LABELS`)."""

    hidden_size: int
    vocab_size: int
    num_layers: int
    model_type: str
    draft_name: str = ""
    draft_checksum: str = ""
    layers: int = 3
    weight: float = 6.0
    label: str = "greedy"

    def __post_init__(self) -> None:
        if self.layers < 0 or self.hidden_size < 1:
            raise ValueError(f"an acceptance head needs layers >= 0 and hidden_size >= 1, got {self.layers}, "
                             f"{self.hidden_size}")
        if not self.weight > 0:
            raise ValueError(f"the rejected class weight must be > 0, got {self.weight}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")

    @classmethod
    def for_draft(cls, draft, layers: int = 3, weight: float = 6.0, label: str = "greedy") -> AcceptanceHeadConfig:
        config = draft.config
        return cls(hidden_size=config.hidden_size, vocab_size=vocab_size(draft),
                   num_layers=config.num_hidden_layers, model_type=config.model_type,
                   draft_name=str(getattr(config, "_name_or_path", "") or ""), draft_checksum=weights_checksum(draft),
                   layers=layers, weight=float(weight), label=label)

    def check_draft(self, draft) -> None:
        """ValueError naming the first shape mismatch with `draft`; a warning for another checkpoint of its shape."""
        config = draft.config
        for what, ours, theirs in (("model type", self.model_type, config.model_type),
                                   ("hidden size", self.hidden_size, config.hidden_size),
                                   ("vocab", self.vocab_size, vocab_size(draft)),
                                   ("layer count", self.num_layers, config.num_hidden_layers)):
            if ours != theirs:
                raise ValueError(f"acceptance head was trained for a draft of {what} {ours}, this draft has "
                                 f"{theirs}; train a head for this draft ({TRAIN_COMMAND})")
        if self.draft_checksum and self.draft_checksum != weights_checksum(draft):
            warnings.warn(f"acceptance head was trained for another checkpoint of this draft's shape "
                          f"({self.draft_name or 'unnamed'}); its probabilities may be off for this one",
                          RuntimeWarning, stacklevel=2)


class ResidualBlock(nn.Module):
    """x + silu(W x + b), W zero-initialised (Medusa / SpecDec++): an untrained block is the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + F.silu(self.linear(hidden))


class AcceptanceHead(nn.Module):
    def __init__(self, config: AcceptanceHeadConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(ResidualBlock(config.hidden_size) for _ in range(config.layers))
        self.out = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) draft hidden states -> (...,) the training logit (odds shrunk by the class weight)."""
        for block in self.blocks:
            hidden = block(hidden)
        return self.out(hidden)[..., 0]

    def probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...,) calibrated P(the target accepts the token drafted from there)."""
        return torch.sigmoid(self(hidden) + math.log(self.config.weight))

    def save(self, path: str | os.PathLike) -> None:
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()}
        _write_safetensors(Path(path), tensors, {METADATA_KEY: json.dumps(dataclasses.asdict(self.config))})

    @classmethod
    def load(cls, path: str | os.PathLike, draft=None) -> AcceptanceHead:
        """A head from its safetensors file; with `draft`, checked against it. Every bad file -> ValueError."""
        config, tensors, _ = _read_head_file(Path(path))
        head = cls(config)
        try:
            head.load_state_dict(tensors, assign=True)  # keep the saved dtype
        except RuntimeError as error:
            raise ValueError(f"{path}: its tensors do not match its acceptance head config ({error})") from error
        if draft is not None:
            config.check_draft(draft)
        return head.eval()


def _read_head_file(path: Path) -> tuple[AcceptanceHeadConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(head config, tensors, metadata) of a head or checkpoint file."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"no acceptance head file at {path}; train one with `{TRAIN_COMMAND}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if METADATA_KEY not in metadata:
                raise ValueError(f"its metadata has no {METADATA_KEY!r} entry")
            config = AcceptanceHeadConfig(**json.loads(metadata[METADATA_KEY]))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors, JSON and config errors all mean "not a head file"
        raise ValueError(f"{path} is not a readable acceptance head file ({type(error).__name__}: {error}); "
                         f"write one with `{TRAIN_COMMAND}`") from error
    return config, tensors, metadata


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write beside `path`, then rename into place: an interrupted save never leaves half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(scratch), metadata=metadata)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def weights_checksum(model) -> str:
    """sha256 of the first 256 values of the first and last parameter tensors, rounded to bfloat16: the same
    checkpoint gives the same sum wherever it was loaded from and in any dtype (up to rare double rounding from
    float64), another checkpoint (almost surely) another."""
    digest = hashlib.sha256()
    parameters = list(model.parameters())
    for tensor in (parameters[0], parameters[-1]):
        sample = tensor.detach().reshape(-1)[:256].float().to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class AcceptanceExamples:
    """hidden: (N, H) float32 (float64 for a float64 draft) the draft's last hidden state where each token was
    drafted; tokens: (N,) int64 the drafted tokens; labels: (N,) in [0, 1]; sequence: (N,) int64 the token
    sequence each row comes from."""

    hidden: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    sequence: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, keep: torch.Tensor) -> AcceptanceExamples:
        return AcceptanceExamples(self.hidden[keep], self.tokens[keep], self.labels[keep], self.sequence[keep])

    def split(self) -> tuple[AcceptanceExamples, AcceptanceExamples]:
        """(train, held-out): every `HELD_OUT_EVERY`-th sequence is held out, at least one, never all."""
        count = int(self.sequence.max()) + 1
        if count < 2:
            raise ValueError("acceptance data of one sequence cannot be split; give more text or a lower "
                             "--max-length")
        every = min(HELD_OUT_EVERY, count)
        held_out = self.sequence % every == every - 1
        return self.rows(~held_out), self.rows(held_out)

    def digest(self) -> str:
        """A checksum of the labels: a resumed run must train on the same data."""
        return hashlib.sha256(self.labels.double().cpu().numpy().tobytes()).hexdigest()[:16]


def position_labels(draft_logits: torch.Tensor, target_logits: torch.Tensor, tokens: torch.Tensor,
                    label: str) -> torch.Tensor:
    """(..., V) logits of both models at the same positions and (...) drafted tokens (the logits broadcast to
    them) -> (...) labels (module docstring): greedy 1[token == argmax p], ratio min(1, p(token) / q(token)) at
    temperature 1."""
    if label == "greedy":
        return (tokens == target_logits.argmax(-1)).to(torch.float32)
    if label != "ratio":
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    log_p, log_q = (_token_log_probs(logits, tokens) for logits in (target_logits, draft_logits))
    return (log_p - log_q).clamp(max=0.0).exp().to(torch.float32)


def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], in float32 at least."""
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return log_probs.expand(*tokens.shape, log_probs.shape[-1]).gather(-1, tokens[..., None])[..., 0]


def check_vocab(draft, target) -> None:
    if vocab_size(draft) != vocab_size(target):
        raise ValueError(f"draft vocab {vocab_size(draft)} != target vocab {vocab_size(target)}; pass a draft built "
                         f"for the target's tokenizer")


@torch.no_grad()
def acceptance_examples(draft, target, sequences: torch.Tensor, label: str = "greedy", sampled: bool = False,
                        batch_size: int = 4, seed: int = 0, progress: Callable[[int], None] | None = None
                        ) -> AcceptanceExamples:
    """(n, L) token sequences -> one example per position (two with `sampled`), teacher-forced through both
    models (module docstring). Rows are ordered by sequence, then position, greedy before sampled."""
    check_vocab(draft, target)
    generator = torch.Generator(draft.device).manual_seed(seed)
    dtype = torch.float64 if next(draft.parameters()).dtype == torch.float64 else torch.float32
    hidden, tokens, labels, sequence = [], [], [], []
    for first in range(0, len(sequences), batch_size):
        ids = sequences[first: first + batch_size]
        out = draft(input_ids=ids.to(draft.device), output_hidden_states=True, use_cache=False)
        target_logits = target(input_ids=ids.to(target.device), use_cache=False).logits.to(draft.device)
        picks = [out.logits.argmax(-1)]
        if sampled:
            probs = out.logits.float().softmax(-1).flatten(0, 1)
            picks.append(torch.multinomial(probs, 1, generator=generator).view(ids.shape))
        picks = torch.stack(picks, -1)  # (B, L, picks): rows by sequence, position, pick
        labels.append(position_labels(out.logits[:, :, None], target_logits[:, :, None], picks, label).flatten().cpu())
        tokens.append(picks.flatten().cpu())
        hidden.append(out.hidden_states[-1].to(dtype)[:, :, None].expand(-1, -1, picks.shape[-1], -1).flatten(0, 2))
        sequence.append(torch.arange(first, first + len(ids))[:, None, None].expand(picks.shape).flatten())
        if progress is not None:
            progress(len(ids))
    return AcceptanceExamples(torch.cat(hidden), torch.cat(tokens), torch.cat(labels), torch.cat(sequence))


@torch.no_grad()
def continue_with_target(target, sequences: torch.Tensor, new_tokens: int, batch_size: int = 8) -> torch.Tensor:
    """(n, L) -> (n, L): each sequence's first L - new_tokens tokens, then the target's greedy continuation (EOS
    suppressed, so every row keeps its length): text the target itself wrote, as the committed context is."""
    from transformers import GenerationConfig

    length = sequences.shape[1]
    if not 0 < new_tokens < length:
        raise ValueError(f"generate must be in [1, {length - 1}] (the sequence length {length} minus one prompt "
                         f"token), got {new_tokens}")
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=target.generation_config.eos_token_id)
    rows = []
    for prompts in sequences[:, : length - new_tokens].split(batch_size):
        ids = prompts.to(target.device)
        rows.append(target.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    generation_config=config).cpu())
    return torch.cat(rows)


# --------------------------------------------------------------------------------------------------- metrics


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
    """Mean of -(y log s(z) + w (1 - y) log(1 - s(z))) (module docstring)."""
    return -(labels * F.logsigmoid(logits) + weight * (1 - labels) * F.logsigmoid(-logits)).mean()


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error over `bins` equal-width bins of [0, 1]: Σ_b (n_b / N) |mean p_b - mean y_b|
    (p = 1 falls in the last bin). Example: p (.1, .3, .9), y (0, 1, 1), 10 bins -> (.1 + .7 + .1) / 3 = .3."""
    probs, labels = probs.double().flatten(), labels.double().flatten()
    which = (probs * bins).long().clamp(0, bins - 1)
    gaps = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, probs - labels)  # n_b (mean p_b - mean y_b)
    return float(gaps.abs().sum() / max(len(probs), 1))


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve = P(a positive's score > a negative's), ties counted half (Mann-Whitney U with
    average ranks); nan when either class is absent."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based ranks start..end of each tie group, averaged
    ranks = torch.empty_like(scores)
    ranks[order] = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(head: AcceptanceHead, examples: AcceptanceExamples, batch_size: int = 4096) -> dict[str, float]:
    """Held-out numbers: the training loss, BCE of the calibrated probabilities, ECE (10 bins), accuracy and AUC
    (a label >= 0.5 counts as accepted), and the mean label and prediction."""
    was_training = head.training
    head.eval()
    parameter = next(head.parameters())
    logits = torch.cat([head(rows.to(parameter.device, parameter.dtype))
                        for rows in examples.hidden.split(batch_size)]).double().cpu()
    head.train(was_training)
    labels = examples.labels.double()
    calibrated = logits + math.log(head.config.weight)
    probs = torch.sigmoid(calibrated)
    return {"loss": float(weighted_bce(logits, labels, head.config.weight)),
            "bce": float(F.binary_cross_entropy_with_logits(calibrated, labels)),
            "ece": ece(probs, labels), "accuracy": float(((probs >= 0.5) == (labels >= 0.5)).double().mean()),
            "auc": auc(probs, labels >= 0.5), "mean_label": float(labels.mean()), "mean_prob": float(probs.mean())}


# -------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimiser steps (AdamW, cosine from lr to lr/10); batch_size: example rows per step; save_every:
    steps between checkpoints (0: only at the end)."""

    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.save_every < 0 or not self.lr > 0:
            raise ValueError(f"need steps >= 0, batch_size >= 1, save_every >= 0, lr > 0; got {self}")


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class TrainResult:
    head: AcceptanceHead
    before: dict[str, float]  # `evaluate` on the held-out rows, untrained and trained
    after: dict[str, float]
    state: TrainState


def train_acceptance_head(examples: AcceptanceExamples, head_config: AcceptanceHeadConfig, config: TrainConfig,
                          checkpoint: Path | None = None, resume: bool = False, stop_after: int | None = None,
                          progress: bool = False) -> TrainResult:
    """Train a head on the train split of `examples`, evaluate it on the held-out split. checkpoint: a file to
    save the head, the optimiser state and the step to (every `save_every` steps and at the end); resume: continue
    from it (it must exist and match). stop_after: stop once this many steps are done (as if interrupted)."""
    train, held_out = examples.split()
    with torch.random.fork_rng(devices=[]):  # the initial weights are a function of the seed alone
        torch.manual_seed(config.seed)
        head = AcceptanceHead(head_config).to(train.hidden.device, train.hidden.dtype)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    before = evaluate(head, held_out)
    digest = examples.digest()
    state = _restore(checkpoint, head, optimizer, config, digest) if resume else TrainState()
    save = None if checkpoint is None else lambda: _save_checkpoint(checkpoint, head, optimizer, config, state,
                                                                    digest)
    stop = config.steps if stop_after is None else min(config.steps, stop_after)
    with _progress(progress) as bar:
        task = bar.add_task("acceptance head", total=config.steps, completed=state.step, loss=float("nan"))
        _train(head, optimizer, train, config, state, stop, save, lambda: bar.update(
            task, completed=state.step, loss=state.losses[-1]))
    return TrainResult(head.eval(), before, evaluate(head, held_out), state)


def _train(head, optimizer, train: AcceptanceExamples, config: TrainConfig, state: TrainState, stop: int,
           save, advanced) -> None:
    """Steps state.step .. stop - 1; step k's rows are drawn by a generator seeded by (seed, k), so a resumed run
    reads the rows it would have read."""
    head.train()
    while state.step < stop:
        rows = torch.randint(len(train), (config.batch_size,),
                             generator=torch.Generator().manual_seed(config.seed * 1_000_003 + state.step))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * state.step / max(config.steps, 1))))
        loss = weighted_bce(head(train.hidden[rows]), train.labels[rows].to(train.hidden), head.config.weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        state.losses.append(loss.item())
        advanced()
        if save is not None and (state.step == stop or config.save_every and state.step % config.save_every == 0):
            save()


def _save_checkpoint(path: Path, head: AcceptanceHead, optimizer, config: TrainConfig, state: TrainState,
                     digest: str) -> None:
    """One safetensors file: `head.*` weights, `optimizer.<param>.<key>` AdamW state, the rest as JSON metadata."""
    tensors = {f"head.{name}": value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    training = {"config": dataclasses.asdict(config), "step": state.step, "losses": state.losses, "data": digest}
    _write_safetensors(path, tensors, {METADATA_KEY: json.dumps(dataclasses.asdict(head.config)),
                                       TRAIN_KEY: json.dumps(training)})


def _restore(path: Path | None, head: AcceptanceHead, optimizer, config: TrainConfig, digest: str) -> TrainState:
    """Load a checkpoint into `head` and `optimizer` -> its state; ValueError if it is absent, bad or another run's."""
    if path is None or not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {path}; run without --resume to start")
    head_config, tensors, metadata = _read_head_file(path)
    try:
        training = json.loads(metadata[TRAIN_KEY])
        step, losses, data, saved = training["step"], training["losses"], training["data"], training["config"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is no acceptance head training checkpoint ({type(error).__name__}: {error}); "
                         f"run without --resume to start over") from error
    saved = {key: value for key, value in saved.items() if key not in ("steps", "save_every")}
    mine = {key: value for key, value in dataclasses.asdict(config).items() if key not in ("steps", "save_every")}
    differs = sorted(key for key in mine if saved.get(key) != mine[key])
    differs += ["head"] if head_config != head.config else []
    differs += ["data"] if data != digest else []
    if differs:
        raise ValueError(f"the checkpoint {path} is of another run ({', '.join(differs)} differ); pass the same "
                         f"settings, or run without --resume to start over")
    head.load_state_dict({name[5:]: value for name, value in tensors.items() if name.startswith("head.")})
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            moments.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({**optimizer.state_dict(), "state": moments})
    return TrainState(step, list(losses))


def checkpoint_path(out: Path) -> Path:
    """Where a training run of the head file `out` keeps its checkpoint: head.safetensors -> head.ckpt.safetensors."""
    return out.with_name(f"{out.name.removesuffix('.safetensors')}.ckpt.safetensors")


def _progress(enabled: bool) -> Progress:
    columns = [TextColumn("  {task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeElapsedColumn()]
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


def report_table(result: TrainResult) -> Table:
    table = Table(title=f"acceptance head on held-out positions ({result.state.step} steps)")
    for column in ("metric", "untrained", "trained"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    labels = {"loss": "weighted BCE (training loss)", "bce": "BCE of the probabilities", "ece": "ECE (10 bins)",
              "accuracy": "accuracy (p >= 0.5)", "auc": "AUC", "mean_label": "mean label",
              "mean_prob": "mean predicted P(accept)"}
    for key, label in labels.items():
        table.add_row(label, f"{result.before[key]:.4f}", f"{result.after[key]:.4f}")
    return table


# --------------------------------------------------------------------------------------------------------- CLI


def read_source(data: str) -> list[str]:
    """Texts of a data source: a text file, or what `distill.load_texts` reads (zoo, a .jsonl with a "text" field,
    a directory of .txt/.md/.py files, a cached `datasets` name)."""
    from specdec.train.distill import load_texts
    from specdec.train.early_exit import read_texts

    path = Path(data)
    if path.is_file() and path.suffix != ".jsonl":
        return read_texts(path)
    train, held_out = load_texts(data)
    return train + held_out


def add_acceptance_head_parser(subparsers) -> argparse.ArgumentParser:
    """Add `acceptance-head` to the subparsers of `specdec train`."""
    parser = subparsers.add_parser("acceptance-head", help="train a SpecDec++ acceptance head for a draft model",
                                   description=__doc__.splitlines()[0])
    models = "a catalogue name, a .gguf file, zoo:<preset>, an HF folder or id"
    parser.add_argument("--target", required=True, help=f"the target (with its tokenizer): {models}")
    parser.add_argument("--draft", required=True, help=f"the draft model: {models}")
    parser.add_argument("--data", required=True, help="a text file | a dir of .txt/.md/.py | a .jsonl with a 'text' "
                                                      "field | zoo | a cached `datasets` name")
    parser.add_argument("--out", required=True, type=Path, help="head file to write (.safetensors); the checkpoint "
                                                                "goes beside it (.ckpt.safetensors)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="example rows per step")
    parser.add_argument("--layers", type=int, default=3, help="residual blocks before the output logit")
    parser.add_argument("--weight", type=float, default=6.0, help="weight of the rejected class in the loss")
    parser.add_argument("--label", choices=LABELS, default="greedy", help="greedy: 1[draft token == target argmax]; "
                                                                          "ratio: min(1, p/q)")
    parser.add_argument("--sampled", action="store_true", help="also label a token sampled from the draft")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--limit", type=int, default=512, help="at most this many sequences")
    parser.add_argument("--generate", type=int, default=0, help="the target writes the last N tokens of each "
                                                                "sequence (greedy); 0: the given text only")
    parser.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="of both models: auto | float32 | bfloat16 | ...")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.set_defaults(run=acceptance_head_command)
    return parser


def acceptance_head_command(args: argparse.Namespace) -> int:
    from specdec.models import load_model
    from specdec.train.early_exit import token_stream

    console = Console(stderr=True)
    target, tokenizer, _ = load_model(args.target, args.dtype, args.device)
    draft, _, _ = load_model(args.draft, args.dtype, args.device, tokenizer=tokenizer)
    check_vocab(draft, target)
    sequences = token_stream(read_source(args.data), tokenizer, args.max_length)[: args.limit]
    if args.generate:
        console.print(f"  the target writes the last {args.generate} tokens of {len(sequences)} sequences")
        sequences = continue_with_target(target, sequences, args.generate)
    with _progress(True) as bar:
        task = bar.add_task("labels", total=len(sequences), loss=float("nan"))
        examples = acceptance_examples(draft, target, sequences, args.label, args.sampled, seed=args.seed,
                                       progress=lambda count: bar.advance(task, count))
    head_config = AcceptanceHeadConfig.for_draft(draft, args.layers, args.weight, args.label)
    config = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         save_every=args.save_every)
    result = train_acceptance_head(examples, head_config, config, checkpoint_path(args.out), args.resume,
                                   progress=True)
    result.head.save(args.out)
    console.print(report_table(result))
    console.print(f"  {len(examples)} examples of {len(sequences)} sequences; head saved to {args.out}")
    return 0
