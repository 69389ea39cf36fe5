"""Online distillation: a drafter that learns from the traffic it serves (OSD, with the anchors' fixes).

**Signal.** Every verification already holds the target's logits at the root and at every node of the tree
(`VerifyResult.logits`). `OnlineLearner.record` keeps, per row, the target's top-k probabilities and the mass of
the rest, and where the row sits: on the committed sequence (the root, the accepted path; the deepest accepted
node's row is the one that made the bonus token) or on a branch the drafter proposed and the target rejected (an
*extra* token whose context is its committed prefix and its tree ancestors). No extra target forward, ever.
Rows at and after the first rejection weigh `reject_weight`.

**Training.** A `Student` is a trainable float32 shadow of what the drafter serves (a draft model, or an early-exit
head on the target's frozen first layers). One record = one sequence: its committed tokens + its extra tokens, run
as one forward with a tree mask (each extra token sees its committed prefix and its ancestors, at position
root + depth, as the verifier saw it). Loss per row: forward KL (default), TVD or JSD(beta) between the target's
top-k (+ rest) distribution and the student's on the same buckets. An update starts once `every` positions are
buffered: one pass over the fresh records mixed with as many replayed from a bounded reservoir, an AdamW step each
`batch_positions` positions, constant learning rate.

**Serving stays lossless.** The served weights change only in `end_sequence` (the drafter's `reset`: a request
boundary), never inside a step, so the q that accepted a draft is the q that made it. A candidate replaces the served
weights only if its expected acceptance, mean sum_x min(p, q) over the held-out records (every `holdout_every`-th
sequence, never trained on), is not worse than the served drafter's; else the shadow rolls back to the served
weights. Each publication bumps `version`.

**Where it runs.** `background=True` trains in a worker thread (on CUDA, on a side stream) while serving goes on; the
candidate is published at the first request boundary after it is ready. Not the default yet: on CUDA a worker's
allocations during a lazily captured CUDA graph of the serving path (global capture mode) would break that capture,
and it has not run on a GPU. `background=False` (the default) trains inline at the
boundary (deterministic: tests, CPUs with no core to spare). Either way `train_s` counts the seconds spent learning.

**Checkpoints.** `save(path)`: shadow and served weights, AdamW state, fresh/reservoir/held-out records, the
learner's RNG and counters, and the caller's `extra` (a stream cursor) in one safetensors file (JSON metadata),
written to a temp file and renamed into place; with `checkpoint` set, after each update's verdict, at the request
boundary (on the serving thread, so nothing changes while it is written; its time counts in `train_s`).
`load(path)` checks that the file belongs to this student.

    learner = OnlineLearner(ModelStudent(draft), OnlineConfig(every=2048))
    learner.record(context, tree_tokens, tree_parents, accepted_nodes, bonus, logits)  # after each verification
    learner.end_sequence()                                                       # at each request boundary
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

LOSSES = ("fkl", "tvd", "jsd")
METADATA_KEY = "specdec_online"
FORMAT = 1


@dataclass(frozen=True)
class OnlineConfig:
    """lr: AdamW learning rate (constant). every: buffered positions that start an update. loss: "fkl" | "tvd" |
    "jsd" (beta: JSD's mixture weight of the target). topk: target probabilities kept per row. batch_positions:
    positions per optimizer step. replay: records the reservoir keeps. reject_weight: weight of rows at and after
    the first rejection. holdout_every: every n-th sequence is held out for the promotion gate (0: no gate).
    holdout_records: held-out records kept (the most recent). epochs: passes over an update's data. background:
    train in a worker thread (default: inline at the boundary).
    checkpoint: a file saved after every update and resumed from at start when it exists. seed: replay sampling."""

    lr: float = 3e-4
    every: int = 2048
    loss: str = "fkl"
    beta: float = 0.5
    topk: int = 32
    batch_positions: int = 512
    replay: int = 256
    reject_weight: float = 2.0
    holdout_every: int = 8
    holdout_records: int = 16
    epochs: int = 1
    background: bool = False
    checkpoint: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"online_lr must be a positive number, got {self.lr}")
        for name in ("every", "topk", "batch_positions", "epochs"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"online_{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"online_loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"online_beta must be in (0, 1), got {self.beta}")
        if not self.reject_weight > 0:
            raise ValueError(f"online_reject_weight must be > 0, got {self.reject_weight}")
        for name in ("replay", "holdout_every", "holdout_records"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"online_{name} must be an integer >= 0, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------------------------ records


@dataclass
class Record:
    """One sequence's training data.  Items = tokens (the committed sequence, T) + extra (rejected branch tokens).

    An item reference r >= 0 is committed token r; r < 0 is extra token -1 - r (so references survive the sequence
    growing).  extra_parent[j]: the item extra token j follows; extra_position[j]: its position id.  Rows:
    row_item[r] = the item whose next-token distribution the target gave, row_ids / row_probs (R, k) its top-k,
    row_weight[r] its weight; the mass outside the top-k is 1 - row_probs.sum().
    """

    tokens: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    extra_parent: list[int] = field(default_factory=list)
    extra_position: list[int] = field(default_factory=list)
    row_item: list[int] = field(default_factory=list)
    row_ids: list[torch.Tensor] = field(default_factory=list)
    row_probs: list[torch.Tensor] = field(default_factory=list)
    row_weight: list[float] = field(default_factory=list)
    features: torch.Tensor | None = None  # a student's frozen inputs at the rows, computed once (not saved)

    @property
    def rows(self) -> int:
        return len(self.row_item)

    def position(self, ref: int) -> int:
        return ref if ref >= 0 else self.extra_position[-1 - ref]

    def index(self, ref: int) -> int:
        """An item reference -> its index in the record's forward ([tokens, extra])."""
        return ref if ref >= 0 else len(self.tokens) - 1 - ref

    def inputs(self) -> tuple[list[int], list[int], torch.Tensor]:
        """(ids, position ids, (L, L) bool allowed) of the record's one forward: causal over the committed tokens,
        each extra token over its committed prefix and its tree ancestors."""
        length = len(self.tokens)
        ids, positions = self.tokens + self.extra, list(range(length)) + self.extra_position
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = torch.nn.functional.pad(allowed, (0, len(self.extra), 0, len(self.extra)))
        for j, parent in enumerate(self.extra_parent):
            item = length + j
            allowed[item] = allowed[self.index(parent)]
            allowed[item, item] = True
        return ids, positions, allowed

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows,) item indices, (rows, k) ids, (rows, k) probabilities, (rows,) weights."""
        return (torch.tensor([self.index(ref) for ref in self.row_item]), torch.stack(self.row_ids),
                torch.stack(self.row_probs), torch.tensor(self.row_weight))


def _pack(records: list[Record], prefix: str) -> dict[str, torch.Tensor]:
    """Records -> flat tensors (for a checkpoint)."""
    def flat(values):
        return torch.tensor([v for r in records for v in values(r)], dtype=torch.int64)

    topk = next((r.row_ids[0].numel() for r in records if r.rows), 1)
    tensors = {"tokens": flat(lambda r: r.tokens), "extra": flat(lambda r: r.extra),
               "extra_parent": flat(lambda r: r.extra_parent), "extra_position": flat(lambda r: r.extra_position),
               "row_item": flat(lambda r: r.row_item),
               "lengths": torch.tensor([[len(r.tokens), len(r.extra), r.rows] for r in records],
                                       dtype=torch.int64).reshape(-1, 3),
               "row_ids": torch.cat([torch.stack(r.row_ids) for r in records if r.rows] or
                                    [torch.zeros(0, topk, dtype=torch.int64)]),
               "row_probs": torch.cat([torch.stack(r.row_probs) for r in records if r.rows] or
                                      [torch.zeros(0, topk)]),
               "row_weight": torch.tensor([w for r in records for w in r.row_weight], dtype=torch.float32)}
    return {f"{prefix}.{name}": value.contiguous() for name, value in tensors.items()}


def _unpack(tensors: dict[str, torch.Tensor], prefix: str) -> list[Record]:
    get = {name.split(".", 1)[1]: value for name, value in tensors.items() if name.startswith(prefix + ".")}
    records, at = [], {"tokens": 0, "extra": 0, "rows": 0}
    for length, extra, rows in get["lengths"].tolist():
        t, e, r = at["tokens"], at["extra"], at["rows"]
        records.append(Record(get["tokens"][t:t + length].tolist(), get["extra"][e:e + extra].tolist(),
                              get["extra_parent"][e:e + extra].tolist(), get["extra_position"][e:e + extra].tolist(),
                              get["row_item"][r:r + rows].tolist(), list(get["row_ids"][r:r + rows].unbind(0)),
                              list(get["row_probs"][r:r + rows].unbind(0)), get["row_weight"][r:r + rows].tolist()))
        at = {"tokens": t + length, "extra": e + extra, "rows": r + rows}
    return records


# ------------------------------------------------------------------------------------------------ students


class ModelStudent:
    """A draft model's trainable float32 shadow. `served`: the model the drafter runs (its weights are replaced in
    place at publication, so captured graphs and caches keep their addresses)."""

    kind = "model"

    def __init__(self, served: torch.nn.Module):
        self.served = served
        self.shadow = copy.deepcopy(served).float().train(False)
        self.shadow.requires_grad_(True)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.shadow.named_parameters())

    def served_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.served.named_parameters())

    def logits(self, record: Record, items: torch.Tensor, served: bool = False) -> torch.Tensor:
        """(R, V) logits of the shadow (or the served model) at `items` of one record's tree-masked forward (the LM
        head runs on those rows only)."""
        model = self.served if served else self.shadow
        parameter = next(model.parameters())
        ids, positions, mask = _tree_inputs(record, parameter.device, parameter.dtype)
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False,
                    logits_to_keep=items.to(parameter.device))
        return out.logits[0]


class HeadStudent:
    """An early-exit head's trainable float32 shadow: the target's first `layer` layers stay frozen (run without
    gradients), the head learns. `drafter`: the `EarlyExitDrafter` (its `hidden_after` and `head`)."""

    kind = "early_exit"

    def __init__(self, drafter):
        self.drafter = drafter
        self.shadow = copy.deepcopy(drafter.head).float()
        self.shadow.requires_grad_(True)

    @property
    def served(self) -> torch.nn.Module:
        return self.drafter.head

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.shadow.named_parameters())

    def served_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.drafter.head.named_parameters())

    def logits(self, record: Record, items: torch.Tensor, served: bool = False) -> torch.Tensor:
        """(R, V) draft logits at `items`: h_L there comes from the frozen layers once per record (cached on it),
        then only the head and the LM head run (with gradients to the head)."""
        from transformers import DynamicCache

        from specdec.train.early_exit import draft_logits

        if record.features is None:
            target = self.drafter.model
            parameter = next(target.parameters())
            with torch.no_grad():
                hidden = self.drafter.hidden_after(*_tree_inputs(record, parameter.device, parameter.dtype),
                                                   DynamicCache())
            record.features = hidden[0, items.to(parameter.device)]
        head = self.drafter.head if served else self.shadow
        return draft_logits(self.drafter.model, head, record.features.to(next(head.parameters()).dtype))


def _tree_inputs(record: Record, device: torch.device, dtype: torch.dtype):
    """One record's forward inputs on `device`: (1, L) ids, (1, L) position ids, (1, 1, L, L) float mask."""
    ids, positions, allowed = record.inputs()
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    return (torch.tensor([ids], device=device), torch.tensor([positions], device=device), mask.to(device))


def _signature(student) -> str:
    shapes = {name: list(p.shape) for name, p in student.parameters().items()}
    return json.dumps({"kind": student.kind, "shapes": shapes}, sort_keys=True)


# ------------------------------------------------------------------------------------------------ losses


def bucket_loss(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """(R,) divergence between the target's top-k + rest buckets (`ids`, `probs`: (R, k)) and the student's
    distribution (`logits`: (R, V)) on the same buckets."""
    log_q = torch.log_softmax(logits.float(), -1)
    log_q_top = log_q.gather(1, ids)
    q_top = log_q_top.exp()
    q_rest = (1.0 - q_top.sum(-1)).clamp_min(1e-12)
    p_rest = (1.0 - probs.sum(-1)).clamp_min(0.0)
    p = torch.cat([probs, p_rest[:, None]], 1)
    q = torch.cat([q_top, q_rest[:, None]], 1)
    log_q_all = torch.cat([log_q_top, q_rest.log()[:, None]], 1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    log_p = p.clamp_min(1e-12).log()
    if loss == "fkl":
        return (p * (log_p - log_q_all)).sum(-1)
    mixture = (beta * p + (1 - beta) * q).clamp_min(1e-12)
    return (beta * (p * (log_p - mixture.log())).sum(-1)
            + (1 - beta) * (q * (log_q_all - mixture.log())).sum(-1))


def expected_acceptance(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(R,) sum_x min(p(x), q(x)) over the target's top-k (a lower bound of 1 - TVD: the acceptance rate of a
    sampled draft)."""
    q_top = torch.softmax(logits.float(), -1).gather(1, ids)
    return torch.minimum(probs, q_top).sum(-1)


# ------------------------------------------------------------------------------------------------ learner


class OnlineLearner:
    """See the module docstring. version: publications so far (0 = the weights it started with)."""

    def __init__(self, student, config: OnlineConfig | None = None):
        self.student, self.config = student, config or OnlineConfig()
        self.background = bool(self.config.background)
        self.optimizer = torch.optim.AdamW(list(student.parameters().values()), lr=self.config.lr, weight_decay=0.0)
        self.rng = random.Random(self.config.seed)
        self.current: Record | None = None
        self.fresh: list[Record] = []
        self.reservoir: list[Record] = []
        self.holdout: list[Record] = []
        self.counts = {"version": 0, "sequences": 0, "positions": 0, "buffered": 0, "updates": 0, "rollbacks": 0,
                       "reservoir_seen": 0}
        self.train_s, self.record_s, self.last_gate = 0.0, 0.0, {}
        self.extra: dict = {}  # the caller's own resumable state (a stream cursor)
        self._worker: threading.Thread | None = None
        self._ready: bool | None = None  # the worker's verdict: True publish, False rolled back, None pending
        self._error: BaseException | None = None
        if self.config.checkpoint and Path(self.config.checkpoint).exists():
            self.load(self.config.checkpoint)

    @property
    def version(self) -> int:
        return self.counts["version"]

    # ---- the serving path

    def record(self, context: Sequence[int], tree_tokens: Sequence[int], tree_parents: Sequence[int],
               accepted_nodes: Sequence[int], bonus_token: int, logits: torch.Tensor) -> None:
        """One verification: `context` = the committed tokens up to the root (its last item); the tree as verified;
        `logits` (>= N+1, V) the target's rows (root first)."""
        started = time.perf_counter()
        rows = len(tree_tokens) + 1
        with torch.no_grad():
            top = logits[:rows].float().softmax(-1).topk(min(self.config.topk, logits.shape[-1]))
            ids, probs = top.indices.cpu(), top.values.cpu()
        record = self._record_for(context)
        ref = {-1: len(record.tokens) - 1}  # tree node -> item reference (Record's encoding); -1 = the root
        accepted = set(accepted_nodes)
        for node in accepted_nodes:
            ref[node] = len(record.tokens)
            record.tokens.append(int(tree_tokens[node]))
        record.tokens.append(int(bonus_token))
        for node, parent in enumerate(tree_parents):  # topological: a parent's reference exists before its child's
            if node not in accepted:
                ref[node] = -1 - len(record.extra)
                record.extra.append(int(tree_tokens[node]))
                record.extra_parent.append(ref[parent])
                record.extra_position.append(record.position(ref[parent]) + 1)
        deepest = accepted_nodes[-1] if accepted_nodes else -1
        rejected_below = any(parent == deepest and node not in accepted for node, parent in enumerate(tree_parents))
        for row, node in enumerate([-1, *range(len(tree_tokens))]):
            late = (node != -1 and node not in accepted) or (node == deepest and rejected_below)
            record.row_item.append(ref[node])
            record.row_ids.append(ids[row])
            record.row_probs.append(probs[row])
            record.row_weight.append(self.config.reject_weight if late else 1.0)
        self.counts["buffered"] += rows
        self.counts["positions"] += rows
        self.record_s += time.perf_counter() - started

    def _record_for(self, context: Sequence[int]) -> Record:
        """The current sequence's record, extended by committed tokens it has not seen (plain steps); a context
        that does not continue it starts a new one."""
        record = self.current
        if record is None or len(context) < len(record.tokens) or list(context[:len(record.tokens)]) != record.tokens:
            if record is not None:
                self._close(record)
            record = self.current = Record(tokens=list(context))
            return record
        record.tokens.extend(int(t) for t in context[len(record.tokens):])
        return record

    def end_sequence(self) -> None:
        """A request boundary: close the current record; publish a candidate that is ready; start an update when
        enough is buffered (inline, or in the worker)."""
        if self.current is not None:
            self._close(self.current)
            self.current = None
        self._collect()
        if self._worker is None and self.counts["buffered"] >= self.config.every and self.fresh:
            fresh, self.fresh, self.counts["buffered"] = self.fresh, [], 0
            if self.background:
                self._ready = None
                self._worker = threading.Thread(target=self._work, args=(fresh,), daemon=True)
                self._worker.start()
            else:
                self._ready = self._update(fresh)
                self._collect()

    def wait(self) -> None:
        """Finish a running update and publish it if it passed (the end of a stream)."""
        if self._worker is not None:
            self._worker.join()
        self._collect()

    def _close(self, record: Record) -> None:
        self.counts["sequences"] += 1
        if not record.rows:
            return
        every = self.config.holdout_every
        if every and self.counts["sequences"] % every == 0:
            self.holdout = (self.holdout + [record])[-self.config.holdout_records:]
        else:
            self.fresh.append(record)

    def _collect(self) -> None:
        """At a boundary: a finished worker's verdict is applied (publish), its error raised."""
        if self._worker is not None and self._worker.is_alive():
            return
        self._worker = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the online learner's update failed: {error}") from error
        verdict, self._ready = self._ready, None
        if verdict:
            self._publish()
        if verdict is not None and self.config.checkpoint:  # here, not in the worker: nothing changes under it
            started = time.perf_counter()
            self.save(self.config.checkpoint)
            self.train_s += time.perf_counter() - started

    # ---- learning

    def _work(self, fresh: list[Record]) -> None:
        try:
            stream = torch.cuda.Stream() if torch.cuda.is_available() and self._device.type == "cuda" else None
            if stream is None:
                self._ready = self._update(fresh)
                return
            with torch.cuda.stream(stream):
                verdict = self._update(fresh)
            stream.synchronize()
            self._ready = verdict
        except BaseException as error:  # noqa: BLE001 - reported at the next boundary, on the serving thread
            self._error = error

    @property
    def _device(self) -> torch.device:
        return next(iter(self.student.parameters().values())).device

    @torch.inference_mode(False)
    @torch.enable_grad()
    def _update(self, fresh: list[Record]) -> bool:
        """Train on `fresh` + replay; gate; True = publish, False = rolled back."""
        started = time.perf_counter()
        replay = self.rng.sample(self.reservoir, min(len(fresh), len(self.reservoir)))
        for _ in range(self.config.epochs):
            batch = fresh + replay
            self.rng.shuffle(batch)
            self._train(batch)
        for record in fresh:
            self._remember(record)
        self.counts["updates"] += 1
        passed = self._gate()
        if not passed:
            self._roll_back()
        self.train_s += time.perf_counter() - started
        return passed

    def _train(self, batch: list[Record]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        pending, weight_sum = 0, 0.0
        losses = []
        for record in batch:
            items, ids, probs, weights = record.targets()
            logits = self.student.logits(record, items)
            device = logits.device
            per_row = bucket_loss(logits, ids.to(device), probs.to(device), self.config.loss, self.config.beta)
            losses.append((per_row * weights.to(device)).sum())
            pending += record.rows
            weight_sum += float(weights.sum())
            if pending >= self.config.batch_positions:
                self._step(losses, weight_sum)
                pending, weight_sum, losses = 0, 0.0, []
        if losses:
            self._step(losses, weight_sum)

    def _step(self, losses: list[torch.Tensor], weight_sum: float) -> None:
        (torch.stack(losses).sum() / max(weight_sum, 1e-9)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _remember(self, record: Record) -> None:
        """Reservoir sampling: every record seen so far is kept with equal probability."""
        capacity = self.config.replay
        self.counts["reservoir_seen"] += 1
        if len(self.reservoir) < capacity:
            self.reservoir.append(record)
        elif capacity:
            slot = self.rng.randrange(self.counts["reservoir_seen"])
            if slot < capacity:
                self.reservoir[slot] = record

    @torch.no_grad()
    def acceptance(self, records: list[Record], served: bool) -> float:
        """Mean expected acceptance (sum min(p, q) over the top-k) of the shadow (or the served weights) on
        `records`' rows."""
        total, rows = 0.0, 0
        for record in records:
            items, ids, probs, _ = record.targets()
            logits = self.student.logits(record, items, served=served)
            device = logits.device
            total += float(expected_acceptance(logits, ids.to(device), probs.to(device)).sum())
            rows += record.rows
        return total / rows if rows else float("nan")

    def _gate(self) -> bool:
        """The candidate may replace the served drafter if its held-out expected acceptance is not worse (no
        held-out records yet: it may)."""
        if not self.holdout:
            self.last_gate = {"candidate": None, "served": None, "passed": True}
            return True
        candidate, served = self.acceptance(self.holdout, False), self.acceptance(self.holdout, True)
        passed = candidate >= served - 1e-4
        self.last_gate = {"candidate": candidate, "served": served, "passed": passed}
        return passed

    @torch.no_grad()
    def _roll_back(self) -> None:
        self.counts["rollbacks"] += 1
        served = self.student.served_parameters()
        for name, parameter in self.student.parameters().items():
            parameter.copy_(served[name])

    @torch.no_grad()
    def _publish(self) -> None:
        """Copy the shadow into the served weights, in place (a request boundary: no step is running)."""
        served = self.student.served_parameters()
        for name, parameter in self.student.parameters().items():
            served[name].copy_(parameter)
        self.counts["version"] += 1

    # ---- checkpoints

    def save(self, path: str | os.PathLike) -> None:
        """Everything needed to resume, in one safetensors file, replaced atomically."""
        from safetensors.torch import save_file

        tensors = {f"shadow.{n}": p.detach().float().cpu().contiguous() for n, p in self.student.parameters().items()}
        tensors.update({f"served.{n}": p.detach().float().cpu().contiguous()
                        for n, p in self.student.served_parameters().items()})
        optimizer = self.optimizer.state_dict()
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).float().cpu().contiguous().reshape(-1) \
                    if key == "step" else value.detach().cpu().contiguous()
        for prefix, records in (("fresh", self.fresh), ("reservoir", self.reservoir), ("holdout", self.holdout),
                                ("current", [self.current] if self.current else [])):
            tensors.update(_pack(records, prefix))
        metadata = {"format": FORMAT, "signature": _signature(self.student), "config": asdict(self.config),
                    "counts": self.counts, "train_s": self.train_s, "rng": _rng_state(self.rng),
                    "param_groups": optimizer["param_groups"], "extra": self.extra}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(staging), metadata={METADATA_KEY: json.dumps(metadata)})
        os.replace(staging, path)

    def load(self, path: str | os.PathLike) -> None:
        """Resume from `save`'s file. A file that is not one, or belongs to another drafter -> ValueError."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = json.loads((handle.metadata() or {})[METADATA_KEY])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors, JSON: all mean "not a checkpoint"
            raise ValueError(f"{path} is not a readable online-learning checkpoint ({type(error).__name__}: "
                             f"{error}); delete it or point online_checkpoint elsewhere") from error
        if metadata.get("format") != FORMAT or metadata.get("signature") != _signature(self.student):
            raise ValueError(f"{path} was written for another drafter (its parameters' names or shapes differ from "
                             f"this {self.student.kind} drafter's); point online_checkpoint at a new file")
        with torch.no_grad():
            for prefix, parameters in (("shadow", self.student.parameters()),
                                       ("served", self.student.served_parameters())):
                for name, parameter in parameters.items():
                    parameter.copy_(tensors[f"{prefix}.{name}"])
        state: dict = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.reshape(()) if key == "step" else value
        self.optimizer.load_state_dict({"state": state, "param_groups": metadata["param_groups"]})
        self.fresh, self.reservoir = _unpack(tensors, "fresh"), _unpack(tensors, "reservoir")
        self.holdout = _unpack(tensors, "holdout")
        current = _unpack(tensors, "current")
        self.current = current[0] if current else None
        self.counts, self.train_s, self.extra = dict(metadata["counts"]), metadata["train_s"], metadata["extra"]
        self.rng.setstate(_rng_from_json(metadata["rng"]))

    def report(self) -> dict:
        return {**self.counts, "train_s": self.train_s, "record_s": self.record_s, "gate": dict(self.last_gate)}


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]


# ------------------------------------------------------------------------------------------------ the command


def add_online_parser(subparsers):
    """Add `online` to the subparsers of `specdec train`."""
    parser = subparsers.add_parser("online", help="serve a stream of prompts with a drafter that learns online "
                                                  "(checkpointed, resumable)", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="a catalogue name, a .gguf file, zoo:<preset>, an HF folder")
    parser.add_argument("--draft", help="a draft model (any source --target takes): the `model` drafter")
    parser.add_argument("--drafter", help="or a drafter spec, e.g. early_exit:layer=8 (online=True is added)")
    parser.add_argument("--data", required=True, help="the stream: what `specdec bench --data` takes (a+b: one "
                                                      "source after the other)")
    parser.add_argument("--out", required=True, type=Path, help="a folder: online.safetensors (the checkpoint, "
                                                                "resumed from when present) and stream.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts per category")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--controller", default="static:max_depth=4,max_nodes=4")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--every", type=int, default=None, help="buffered positions per update")
    parser.add_argument("--loss", choices=LOSSES, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--backend", default="hf")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--template", default="auto", help="prompt format, as specdec bench's --template")
    parser.set_defaults(run=online_command)
    return parser


def online_drafter_spec(args) -> str:
    if bool(args.draft) == bool(args.drafter):
        raise ValueError("give one of --draft (a draft model) or --drafter (a drafter spec)")
    spec = f"model:path={args.draft}" if args.draft else args.drafter
    options = {"online": True, "online_checkpoint": str(args.out / "online.safetensors"), "online_background": False,
               "online_lr": args.lr, "online_every": args.every, "online_loss": args.loss,
               "online_epochs": args.epochs}
    extra = ",".join(f"{key}={value}" for key, value in options.items() if value is not None)
    return f"{spec}{',' if ':' in spec else ':'}{extra}"


def online_command(args) -> int:
    """Serve the stream in order; after each prompt append its line to stream.jsonl. A resumed run (the checkpoint
    exists) drops the lines past the checkpoint's cursor and serves from there: nothing is lost or served twice."""
    from rich.console import Console

    from specdec.evals.data import load_questions
    from specdec.evals.runner import encode_turn
    from specdec.generator import SpeculativeGenerator

    console = Console(stderr=True)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = online_drafter_spec(args)
    generator = SpeculativeGenerator(args.target, drafter=spec, controller=args.controller, backend=args.backend,
                                     dtype=args.dtype, device=args.device)
    questions = [q for part in args.data.split("+") for q in load_questions(part, limit=args.limit)]
    drafter = generator.drafter
    drafter.bind(generator.target_view)  # a path-loaded draft would bind its model (and learner) at first use
    learner = drafter.learner
    start = int(learner.extra.get("served", 0))
    log = args.out / "stream.jsonl"
    kept = [line for line in (log.read_text().splitlines() if log.exists() else [])
            if json.loads(line)["index"] < start]
    log.write_text("".join(line + "\n" for line in kept))
    if start:
        console.print(f"resumed at prompt {start} (drafter version {learner.version})")
    with log.open("a") as sink:
        for index in range(start, len(questions)):
            question = questions[index]
            raw = question.category.startswith("code") and args.template == "auto"
            prompt = encode_turn(generator.tokenizer, [{"role": "user", "content": question.turns[0]}],
                                 "none" if raw else args.template)
            out = generator.generate(prompt, max_new_tokens=args.max_new_tokens)
            learner.extra["served"] = index + 1  # the next boundary's checkpoint covers this prompt
            sink.write(json.dumps({"index": index, "question_id": question.question_id, "version":
                                   out.stats.drafter_version, "tau": out.stats.tau, "new_tokens": out.stats.new_tokens,
                                   "seconds": out.stats.wall_s, "token_ids": out.token_ids}) + "\n")
            sink.flush()
            console.print(f"{index}: tau {out.stats.tau:.2f}, drafter v{out.stats.drafter_version}")
    learner.end_sequence()
    learner.wait()
    learner.save(args.out / "online.safetensors")
    console.print(f"stream done: {len(questions)} prompts, drafter v{learner.version}, "
                  f"learning {learner.train_s:.1f} s")
    return 0
