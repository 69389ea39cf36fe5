"""Exit heads for the `early_exit` drafter: train, save, load.

An **exit head** maps the hidden state after the target's first L decoder layers (`h_L`, as
`output_hidden_states[L]` gives it) to a hidden state that the target's own final norm and LM head (shared, never
copied) turn into draft logits:  draft_logits = lm_head(norm(head(h_L))).

Head kinds (both residual, and zero-initialised, so an untrained head is the identity = a plain early exit):
- "linear": h + W rmsnorm(h)                         (hidden^2 parameters)
- "mlp":    h + W2 silu(W1 rmsnorm(h)), W1: hidden -> 2 hidden

Training is self-supervised on the frozen target's own predictions: KL(target softmax || draft softmax) at every
position of the given token streams. A head file is safetensors with a JSON `ExitHeadConfig` in its metadata;
loading checks it against the target (hidden size, vocab, layer < layers).

    head = train_exit_head(model, layer=3, data=[[1, 403, ...], ...], steps=200)
    head.save("head.safetensors");  head = ExitHead.load("head.safetensors", target=model)
    specdec train early-exit --target DIR --layer 3 --data FILE_OR_DIR --out head.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

METADATA_KEY = "specdec_exit_head"
HEAD_KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class ExitHeadConfig:
    """hidden_size / vocab_size / num_layers: the target's; layer: the head reads h after layers[:layer]."""

    hidden_size: int
    vocab_size: int
    layer: int
    num_layers: int
    model_type: str
    target_name: str = ""
    kind: str = "linear"
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"exit head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if not 1 <= self.layer < self.num_layers:
            raise ValueError(f"exit layer must be in [1, {self.num_layers - 1}] (the target has {self.num_layers} "
                             f"layers; the last one is no early exit), got {self.layer}")

    @classmethod
    def for_target(cls, target, layer: int, kind: str = "linear") -> ExitHeadConfig:
        config = target.config
        return cls(hidden_size=config.hidden_size, vocab_size=target.get_output_embeddings().weight.shape[0],
                   layer=layer, num_layers=config.num_hidden_layers, model_type=config.model_type,
                   target_name=str(getattr(config, "_name_or_path", "") or ""), kind=kind,
                   rms_eps=float(getattr(config, "rms_norm_eps", 1e-6)))

    def check_target(self, target) -> None:
        """ValueError naming the first mismatch between this head and `target`."""
        config = target.config
        vocab = target.get_output_embeddings().weight.shape[0]
        for what, head_value, target_value in (("hidden size", self.hidden_size, config.hidden_size),
                                               ("vocab", self.vocab_size, vocab)):
            if head_value != target_value:
                raise ValueError(f"exit head {what} {head_value} != target {what} {target_value}; "
                                 f"train a head for this target (specdec train early-exit)")
        if self.layer >= config.num_hidden_layers:
            raise ValueError(f"exit head layer {self.layer} needs more than {config.num_hidden_layers} layers "
                             f"in the target; train a head for this target (specdec train early-exit)")


class ExitHead(nn.Module):
    def __init__(self, config: ExitHeadConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.norm_weight = nn.Parameter(torch.ones(width))
        if config.kind == "linear":
            self.up, self.down = None, nn.Linear(width, width, bias=False)
        else:
            self.up, self.down = nn.Linear(width, 2 * width, bias=False), nn.Linear(2 * width, width, bias=False)
        nn.init.zeros_(self.down.weight)  # untrained = identity = plain early exit

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) h_L -> (..., hidden), for the target's final norm + LM head."""
        variance = hidden.pow(2).mean(-1, keepdim=True)
        normed = hidden * torch.rsqrt(variance + self.config.rms_eps) * self.norm_weight
        inner = normed if self.up is None else nn.functional.silu(self.up(normed))
        return hidden + self.down(inner)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(dataclasses.asdict(self.config))})

    @classmethod
    def load(cls, path: str | Path, target=None) -> ExitHead:
        """A head from a safetensors file; with `target`, checked against it. Bad files -> ValueError."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                config = ExitHeadConfig(**json.loads(metadata[METADATA_KEY]))
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors, JSON and config errors all mean "not a head"
            raise ValueError(f"{path} is not a readable exit head file ({type(error).__name__}: {error}); "
                             f"write one with `specdec train early-exit`") from error
        head = cls(config)
        try:
            head.load_state_dict(tensors, assign=True)  # keep the saved dtype
        except RuntimeError as error:
            raise ValueError(f"{path}: tensors do not match its exit head config ({error})") from error
        if target is not None:
            config.check_target(target)
        return head


def draft_logits(target, head: ExitHead, hidden: torch.Tensor) -> torch.Tensor:
    """h_L -> logits through the head and the target's own final norm and LM head."""
    dtype = next(target.parameters()).dtype
    return target.get_output_embeddings()(target.model.norm(head(hidden).to(dtype)))


# ------------------------------------------------------------------------------------------------------ training


def token_stream(data: Sequence[str] | Sequence[Sequence[int]] | Sequence[torch.Tensor], tokenizer=None,
                 seq_len: int = 256) -> torch.Tensor:
    """Texts (with a tokenizer) or token id sequences -> (n_chunks, seq_len) int64 chunks of their concatenation
    (each text followed by EOS when the tokenizer has one). A stream shorter than seq_len is one chunk."""
    pieces: list[int] = []
    for item in data:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("texts need a tokenizer: pass tokenizer= or give token ids")
            pieces += tokenizer(item, add_special_tokens=False)["input_ids"]
            pieces += [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        else:
            pieces += [int(token) for token in item]
    if len(pieces) < 2:
        raise ValueError(f"the training data holds {len(pieces)} tokens; give at least 2")
    seq_len = min(seq_len, len(pieces))
    n_chunks = len(pieces) // seq_len
    return torch.tensor(pieces[: n_chunks * seq_len], dtype=torch.long).view(n_chunks, seq_len)


def train_exit_head(target, layer: int, data, steps: int = 200, lr: float = 3e-3, batch_size: int = 4,
                    seq_len: int = 256, kind: str = "linear", tokenizer=None, head: ExitHead | None = None,
                    seed: int = 0, progress: bool = False) -> ExitHead:
    """Train an exit head at `layer` on the frozen target's own predictions over `data` (texts or token ids).

    Loss: KL(target softmax || draft softmax), mean over positions. Runs on the target's device; the head trains
    in float32 (float64 for a float64 target) and is returned in that dtype."""
    chunks = token_stream(data, tokenizer, seq_len)
    device, target_dtype = target.device, next(target.parameters()).dtype
    head_dtype = torch.float64 if target_dtype == torch.float64 else torch.float32
    head = (head or ExitHead(ExitHeadConfig.for_target(target, layer, kind))).to(device, head_dtype).train()
    head.config.check_target(target)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    frozen = [p.requires_grad for p in target.parameters()]
    target.eval().requires_grad_(False)
    losses: list[float] = []
    try:
        with _progress(progress) as bar:
            task = bar.add_task("exit head", total=steps, loss=float("nan"))
            for _ in range(steps):
                batch = chunks[torch.randint(len(chunks), (min(batch_size, len(chunks)),), generator=generator)]
                loss = _kl_loss(target, head, batch.to(device), layer)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(task, advance=1, loss=losses[-1])
    finally:
        for parameter, requires_grad in zip(target.parameters(), frozen):
            parameter.requires_grad_(requires_grad)
    head.final_loss = sum(losses[-50:]) / max(1, len(losses[-50:]))  # mean KL of the last 50 steps
    return head.eval()


def _kl_loss(target, head: ExitHead, batch: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        out = target(input_ids=batch, output_hidden_states=True, use_cache=False)
        target_logp = out.logits.float().log_softmax(-1)
        hidden = out.hidden_states[layer].to(next(head.parameters()).dtype)
    draft_logp = draft_logits(target, head, hidden).float().log_softmax(-1)
    return nn.functional.kl_div(draft_logp.flatten(0, 1), target_logp.flatten(0, 1), log_target=True,
                                reduction="batchmean")


def _progress(enabled: bool) -> Progress:
    columns = [TextColumn("  {task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeElapsedColumn()]
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


# --------------------------------------------------------------------------------------------------------- CLI


def read_texts(path: str | Path) -> list[str]:
    """A text file, or every file (recursively, sorted) of a directory that reads as UTF-8."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    if not any(texts):
        raise ValueError(f"no UTF-8 text found in {path}")
    return texts


def add_early_exit_parser(subparsers) -> argparse.ArgumentParser:
    """Add `early-exit` to the subparsers of `specdec train`."""
    parser = subparsers.add_parser("early-exit", help="train an exit head for the early_exit drafter",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the target (with its tokenizer): a catalogue name, a .gguf "
                                                        "file, zoo:<preset>, an HF folder or id")
    parser.add_argument("--layer", type=int, required=True, help="exit after this many decoder layers")
    parser.add_argument("--data", required=True, type=Path, help="a text file or a directory of text files")
    parser.add_argument("--out", required=True, type=Path, help="head file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--kind", choices=HEAD_KINDS, default="linear")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.set_defaults(run=early_exit_command)
    return parser


def early_exit_command(args: argparse.Namespace) -> None:
    from specdec.models import load_model

    target, tokenizer, _ = load_model(args.target, torch.float32, args.device)
    head = train_exit_head(target, args.layer, read_texts(args.data), steps=args.steps, lr=args.lr,
                           batch_size=args.batch_size, seq_len=args.seq_len, kind=args.kind, tokenizer=tokenizer,
                           progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head.save(args.out)
    Console(stderr=True).print(f"  exit head (layer {args.layer}, {args.kind}): KL to the target {head.final_loss:.3f} "
                               f"(mean of the last 50 steps); saved to {args.out}")
    return 0
