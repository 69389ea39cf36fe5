"""Batched speculative decoding: B sequences at once, each with its own tree, lossless per row.

`BatchedStaticBackend` keeps the target's KV of B rows in one preallocated buffer (L, 2, B, Hkv, S, D) with a
length per row. One verify step scores every active row's [root + tree] in one forward of shape (B, T), T = the
largest row's N + 1 (rows with fewer nodes are padded; a padding query sees only itself, is never committed):

    row b, query i (its root at i = 0, node j at i = 1 + j):
      position id   length[b] + depth(i)                         (depth-based, per row)
      writes slot   length[b] + i                                 (past the row's committed slots)
      sees          slots [0, length[b]) + its ancestors' slots + itself

so a row's logits never depend on its neighbours (the mask hides everything of theirs: they live in other rows of
the buffer). `commit` then moves each row's accepted path right behind its root in every layer with one gather and
one scatter for all rows (no Python loop over rows; a row's unused index entries move its root onto itself).

`decode_batch` runs the loop: rows that finish (EOS, stop string, length) leave and the next prompt takes the row
(a batch-1 prefill into that row of the buffer); each row has its own drafter and controller (made from their specs),
its own sampling generator (prompt i samples with seed + i) and stopping rule. A `BatchGate` decides each step
whether the batch speculates or steps plainly, on the tokens per second it measures of each; when it speculates, a
`BatchAllocator` cuts the rows' trees to the common width worth its measured cost, and a row whose drafts keep
missing sits out a growing number of speculative steps (its budget 0: no drafter call, no tree). The gate and the
allocator are kept per generator and batch size (`kept_policy`). `batch_steps` yields each row's chunk per step
(`stream(prompts, batch_size=B)`). Model-free drafters propose per row on the host; a drafter with a
`batch_proposer` drafts all rows in one call (the `model` drafter's chains: one draft forward per depth).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.accept import accept, greedy_walk
from specdec.backends.hf import cache_keyword, context_window
from specdec.tree import DraftTree, depth_list, host_ancestor_mask, path_to, subtree


class _RowSlots:
    """Where the current forward writes: (R, T) int64 slots, one row per sequence of the forward; `limit`: the
    slots it reads (every row's [0, limit): the longest row's length + T, not the whole buffer)."""

    def __init__(self, write_slots: torch.Tensor, limit: int):
        self.write_slots, self.limit = write_slots, limit


class _BatchLayer(CacheLayerMixin):
    """Layer `index` of the buffer over the rows `rows` (a slice): `update` writes each row's keys at its own slots."""

    is_compileable = False
    is_sliding = False

    def __init__(self, buffer: torch.Tensor, index: int, rows: slice, slots: _RowSlots):
        super().__init__()
        self.keys, self.values = buffer[index, 0, rows], buffer[index, 1, rows]
        self.slots, self.is_initialized = slots, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, heads, count, dim = key_states.shape
        where = self.slots.write_slots[:, None, :, None].expand(rows, heads, count, dim)
        self.keys.scatter_(2, where, key_states)
        self.values.scatter_(2, where, value_states)
        limit = self.slots.limit
        return self.keys[:, :, :limit], self.values[:, :, :limit]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        raise RuntimeError("the batched backend always passes position ids")

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class RowSlices(Sequence):
    """Per row b its `counts[b]` rows of a step's (queries, V) `values` from `starts[b]` (None: an idle row), sliced
    when asked for: a tensor slice costs ~2 us of host time, and a plain greedy step never asks (its rows take the
    argmax, read for all rows at once)."""

    def __init__(self, values: torch.Tensor, starts: list[int], counts: Sequence[int]):
        self.values, self.starts, self.counts = values, starts, counts

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, b: int) -> torch.Tensor | None:
        count = self.counts[b]
        return self.values[self.starts[b]: self.starts[b] + count] if count else None


class BatchedCache(abc.ABC):
    """What the batched caches share (`BatchedStaticBackend`, `specdec.batch_native.NativeBatchedBackend`): the
    checked sizes, `lengths[b]` = committed tokens cached in row b (its root's position), and a prefill's inputs."""

    def __init__(self, model: PreTrainedModel, batch_size: int, max_len: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model, self.batch_size = model, batch_size
        self.device, self.dtype = model.device, next(model.parameters()).dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = context_window(model.config)
        self.max_len = max_len or self.max_positions
        if not self.max_len:
            raise ValueError("the model states no context window; pass max_len=... to size the batched cache")
        self.lengths = [0] * batch_size

    def prefill_row(self, row: int, token_ids: Sequence[int]) -> None:
        """Row `row` now holds `token_ids` (a prompt but its last token, the first root); its stale tail stays."""
        self.prefill_rows(row, [token_ids])

    @abc.abstractmethod
    def prefill_rows(self, first: int, prompts: Sequence[Sequence[int]]) -> None:
        """Rows first, first + 1, ... now hold `prompts` (each a prompt but its last token)."""

    step_widths: tuple[int, ...] | None = None  # the widths its steps run at (each graph's), a width rounded up

    def capture_all(self) -> None:
        """Capture the steps' graphs before any row is prefilled (a cache with graphs); here: none."""

    @staticmethod
    def _rows_out(logits: torch.Tensor, counts: Sequence[int], stride: int | None, argmax: bool,
                  best: torch.Tensor | None = None):
        """A step's (queries, V) logits -> per row its counts[b] rows (None: an idle row), the rows packed one after
        another (stride None) or row b's from query b * stride; argmax: -> (those, per row the argmax of each of its
        queries as a host list, from `best` or the logits: one device read for all)."""
        starts, at = [], 0
        for b, count in enumerate(counts):
            starts.append(at if stride is None else b * stride)
            at += count
        rows = RowSlices(logits, starts, counts)
        if not argmax:
            return rows
        best = (logits.argmax(-1) if best is None else best).tolist()
        return rows, [best[start: start + count] if count else None for start, count in zip(starts, counts)]

    def plain_run(self, roots: Sequence[int | None], steps: int) -> list[list[int] | None]:
        """`steps` plain greedy steps of every active row (None: idle), each step's argmax the next one's root ->
        per row its `steps` tokens; every row's length grows by `steps`. Here: a step at a time, a read each (the
        native cache runs them with no host read between; the tokens are the same)."""
        self._check_run(roots, steps)
        tokens: list[list[int] | None] = [None if root is None else [] for root in roots]
        empty = DraftTree.empty()
        for _ in range(steps):
            _, best = self.score(roots, [None if root is None else empty for root in roots], argmax=True,
                                 keep_logits=False)
            roots = [None if root is None else best[b][0] for b, root in enumerate(roots)]
            self.commit([None if root is None else [] for root in roots])
            for row, root in zip(tokens, roots):
                if row is not None:
                    row.append(root)
        return tokens

    def run_room(self, roots: Sequence[int | None]) -> int:
        """The most plain steps every active row's cache still holds."""
        return min(self.max_len - self.lengths[b] for b, root in enumerate(roots) if root is not None)

    def _check_run(self, roots: Sequence[int | None], steps: int) -> None:
        room = self.run_room(roots)
        if steps > room:
            raise ValueError(f"a plain run of {steps} steps does not fit: the fullest row has room for {room}")

    def _commit_moves(self, paths: Sequence[Sequence[int] | None], row_slots: int = 0):
        """(source, target) (B, longest) host int64 slots: each row's accepted nodes that are not yet in place and
        the slots right behind its root they move to, a row's slots offset by b * row_slots (a flat layout); unused
        entries move the root onto itself (an idle row: slot 0). None when nothing moves: no row accepted a node, or
        every accepted node already sits where it belongs (node k at depth k + 1: a chain's accepted prefix, the
        usual case, needs no device work). Host lists, no torch call per row."""
        moving = [[] if path is None else [(node, k) for k, node in enumerate(path) if node != k] for path in paths]
        longest = max(map(len, moving))
        if not longest:
            return None
        source, target = [], []
        for b, (path, moves) in enumerate(zip(paths, moving)):
            root = b * row_slots + (self.lengths[b] if path is not None and self.lengths[b] < self.max_len else 0)
            rest = [root] * (longest - len(moves))
            source.append([root + 1 + node for node, _ in moves] + rest)
            target.append([root + 1 + k for _, k in moves] + rest)
        return torch.tensor(source), torch.tensor(target)

    def _advance(self, paths: Sequence[Sequence[int] | None]) -> None:
        for b, path in enumerate(paths):
            if path is not None:
                self.lengths[b] += 1 + len(path)

    def _start_rows(self, first: int, prompts: Sequence[Sequence[int]]) -> list[int]:
        """Rows first, first + 1, ... get `prompts`' lengths (checked against the cache); -> the lengths."""
        counts = [len(token_ids) for token_ids in prompts]
        for offset, count in enumerate(counts):
            if count + 1 > self.max_len:
                raise ValueError(f"row {first + offset}: the prompt has {count + 1} tokens; the cache holds "
                                 f"{self.max_len}")
            self.lengths[first + offset] = count
        return counts

    def _prefill_inputs(self, first: int, prompts: Sequence[Sequence[int]]):
        """Rows first, first + 1, ... get `prompts`' lengths; -> None (nothing to run), or the padded forward's
        (R, W) host ids and (R, W, W) host mask: causal within each prompt, a padding query sees only itself."""
        counts = self._start_rows(first, prompts)
        width = max(counts)
        if not width:
            return None
        span = torch.arange(width)
        real = span[None, None, :] < torch.tensor(counts)[:, None, None]
        visible = (span[None, :, None] >= span[None, None, :]) & real | torch.eye(width, dtype=torch.bool)
        ids = torch.tensor([list(token_ids) + [0] * (width - len(token_ids)) for token_ids in prompts])
        return ids, visible


class BatchedStaticBackend(BatchedCache):
    """The target's KV for `batch_size` rows on HF's modules (a `Cache` whose layers write each row at its slots)."""

    def __init__(self, model: PreTrainedModel, batch_size: int, max_len: int | None = None):
        super().__init__(model, batch_size, max_len)
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.buffer = torch.zeros((config.num_hidden_layers, 2, batch_size, kv_heads, self.max_len, head_dim),
                                  dtype=self.dtype, device=self.device)

    def _cache(self, rows: slice, slots: _RowSlots) -> Cache:
        return Cache(layers=[_BatchLayer(self.buffer, index, rows, slots) for index in range(self.buffer.shape[0])])

    def _forward(self, rows: slice, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 visible: torch.Tensor, last_only: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """ids / positions / slots (R, T); visible (R, T, limit) bool -> (R, T or 1, V) logits; keep: (K,) indices
        into the flattened (R * T) queries -> (K, V), the LM head applied to those queries' hidden states only
        (a pre-hook on the head: what the model does to the logits after it, softcapping or scaling, still runs)."""
        where = _RowSlots(slots, visible.shape[-1])
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        hook = None if keep is None else self.model.get_output_embeddings().register_forward_pre_hook(
            lambda head, args: (args[0].flatten(0, -2).index_select(0, keep), *args[1:]))
        try:
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask[:, None],
                             **{cache_keyword(self.model.forward): self._cache(rows, where)}, use_cache=True,
                             **({"logits_to_keep": 1} if last_only else {}))
        finally:
            if hook is not None:
                hook.remove()
        return out.logits

    @torch.inference_mode()
    def prefill_rows(self, first: int, prompts: Sequence[Sequence[int]]) -> None:
        """Rows first, first + 1, ... now hold `prompts` (each a prompt but its last token), in one forward padded
        to the longest: a padding query sees only itself and writes past its row's length (stale, never read)."""
        inputs = self._prefill_inputs(first, prompts)
        if inputs is None:
            return
        ids, visible = inputs
        places = torch.arange(ids.shape[1]).expand(len(prompts), -1).to(self.device)
        self._forward(slice(first, first + len(prompts)), ids.to(self.device), places, places,
                      visible.to(self.device), last_only=True)

    @torch.inference_mode()
    def score(self, roots: Sequence[int | None], trees: Sequence[DraftTree | None], argmax: bool = False,
              keep_logits: bool = True):
        """One forward over every active row's [root + tree] (None: an idle row) -> per row (N_b + 1, V) logits;
        argmax: -> (those, per row the argmax of each of its queries as a host list: one device read for all).
        (keep_logits: the logits are always a step's own tensor here.)"""
        active = [b for b, root in enumerate(roots) if root is not None]
        width = max(len(trees[b]) + 1 for b in active)
        batch, size = self.batch_size, self.max_len
        for b in active:
            if self.lengths[b] + width > size:
                raise ValueError(f"row {b}: the cache holds {size} tokens; this step needs {self.lengths[b] + width}")
        limit = max(self.lengths[b] for b in active) + width  # idle rows write at [0, width)
        # host lists for the rows' own parts (no torch call per row), then a handful of tensor ops for all rows
        live = set(active)
        ids, depth, starts, counts, blocks = [], [], [0] * batch, [0] * batch, []
        shapes: dict[tuple[int, ...], tuple[list[int], torch.Tensor]] = {}  # one mask per tree shape in the batch
        for b in range(batch):
            tree = trees[b] if b in live else None
            parents = () if tree is None else tree.host_parents
            found = shapes.get(parents)
            if found is None:  # its depths, and its block padded to the width (a padding query sees only itself)
                count = len(parents) + 1
                padded = torch.eye(width, dtype=torch.bool)
                if parents:
                    padded[:count, :count] = host_ancestor_mask(tree, with_root=True)
                found = shapes[parents] = ([0] + depth_list(tree) + [0] * (width - count) if parents else
                                           [0] * width, padded)
            depth.append(found[0])
            blocks.append(found[1])
            tokens = list(tree.host_tokens or tree.tokens.tolist()) if parents else []
            ids.append([roots[b] or 0] + tokens + [0] * (width - 1 - len(tokens)))
            if b in live:
                starts[b], counts[b] = self.lengths[b], len(parents) + 1
        block = torch.stack(blocks)
        start = torch.tensor(starts)
        span = torch.arange(width)
        slots = start[:, None] + span  # an idle row's slots are rewritten by its next prefill
        positions = start[:, None] + torch.tensor(depth)
        seen = (torch.arange(limit)[None, None, :] < start[:, None, None]) & (span[None, :, None]
                                                                              < torch.tensor(counts)[:, None, None])
        visible = seen.scatter_(2, slots[:, None, :].expand(batch, width, width), block)  # + the tree's own block
        ids = torch.tensor(ids)
        real = [b * width + i for b in active for i in range(counts[b])]  # the LM head scores only real queries
        keep = None if len(real) == batch * width else torch.tensor(real).to(self.device)
        logits = self._forward(slice(None), ids.to(self.device), positions.to(self.device), slots.to(self.device),
                               visible.to(self.device), keep=keep)
        return self._rows_out(logits.flatten(0, -2), counts, width if keep is None else None, argmax)

    @torch.inference_mode()
    def commit(self, paths: Sequence[Sequence[int] | None]) -> None:
        """Per active row, its accepted nodes (path order): their KV moves behind the row's root in every layer (one
        gather, one scatter for all rows) and the row's length grows by 1 + len(path). None: an idle row."""
        moves = self._commit_moves(paths)
        if moves is not None:
            source, target = moves
            layers, _, batch, heads, _, dim = self.buffer.shape
            shape = (layers, 2, batch, heads, source.shape[1], dim)
            source = source.to(self.device)[None, None, :, None, :, None].expand(shape)
            target = target.to(self.device)[None, None, :, None, :, None].expand(shape)
            self.buffer.scatter_(4, target, self.buffer.gather(4, source))
        self._advance(paths)


@dataclass
class RowOutcome:
    """One row's verification: the accepted nodes, their tokens and the bonus token."""

    accepted_nodes: list[int]
    accepted_tokens: list[int]
    bonus_token: int
    logits: torch.Tensor = field(repr=False)


def accept_row(tree: DraftTree, logits: torch.Tensor, params, generator, best: list[int] | None = None
               ) -> RowOutcome:
    """Greedy: the argmax walk (`best`: the argmax of each of the row's queries, if already read); else recursive
    rejection sampling (`accept`) with the row's own generator."""
    if params.greedy:
        if best is not None and not len(tree):  # a plain step: the root's argmax
            return RowOutcome([], [], best[0], logits)
        best = logits.argmax(-1).tolist() if best is None else best
        tokens = tree.host_tokens if tree.host_tokens is not None else tree.tokens.tolist()
        deepest, bonus = greedy_walk(tree.host_parents, tokens, best)
    else:
        tree = tree.to(logits.device)
        outcome = accept(tree, logits, params, generator)
        deepest, bonus = int(outcome.deepest_node), int(outcome.bonus_token)
        tokens = tree.tokens.tolist()
    nodes = path_to(tree, deepest)
    return RowOutcome(nodes, [tokens[node] for node in nodes], bonus, logits)


PROBE_SHARE = 0.02  # the batch gate's probes of the losing kind may cost at most this share of the time


class BatchGate:
    """Speculate, or step the whole batch plainly, on measured rates: committed tokens per second of recent
    speculative steps against recent plain ones (moving sums, each decayed by `decay` at a step of its kind). The
    losing kind is probed after a gap of steps that doubles while it keeps losing (1, 2, 4, ... `max_gap`), and is at
    least what keeps the probes' loss within PROBE_SHARE of the time: a probe costs its step's seconds less the time
    the winning kind would take for its tokens. (On a GPU a speculative step of 48 rows costs several plain ones in
    host time: probes at the doubling gaps alone made `ngram` run at 0.5x of batched `ar`.) The gap falls back to 1
    when a probe wins. A plain step calls no drafter and no controller: where verifying the rows' trees costs more
    than they give (a large batch, a slow drafter), the batch runs as batched `ar`."""

    def __init__(self, decay: float = 0.8, max_gap: int = 1024):
        self.sums = {True: [0.0, 0.0, 0.0], False: [0.0, 0.0, 0.0]}  # speculated? -> decayed (tokens, seconds, steps)
        self.decay, self.max_gap, self.gap, self.since, self.probing = decay, max_gap, 1, 0, False

    def rate(self, speculative: bool) -> float | None:
        tokens, seconds, _ = self.sums[speculative]
        return tokens / seconds if seconds else None

    def speculate(self) -> bool:
        """Whether the next step speculates."""
        spec, plain = self.rate(True), self.rate(False)
        if spec is None or plain is None:
            return spec is None  # measure each kind once: speculative first
        best = spec >= plain
        if self.since >= self.gap:
            self.since, self.probing = 0, True
            return not best
        self.since += 1
        return best

    def observe(self, speculative: bool, tokens: int, seconds: float) -> None:
        kept_tokens, kept_seconds, kept_steps = self.sums[speculative]
        self.sums[speculative] = [kept_tokens * self.decay + tokens, kept_seconds * self.decay + seconds,
                                  kept_steps * self.decay + 1.0]
        if self.probing:  # a probe of the losing kind: did it win?
            self.probing = False
            other = self.rate(not speculative)
            if other is not None and self.rate(speculative) > other:
                self.gap = 1
            else:
                self.gap = min(max(2 * self.gap, self._affordable_gap(speculative)), self.max_gap)

    def _affordable_gap(self, losing: bool) -> int:
        """The fewest steps of the winning kind between probes of the losing one that keep the probes' loss (a
        probe's seconds less the winner's seconds for its tokens) within PROBE_SHARE of the time."""
        tokens, seconds, steps = self.sums[losing]
        win_tokens, win_seconds, win_steps = self.sums[not losing]
        if not (steps and win_steps and win_tokens and win_seconds):
            return 1
        probe_s, win_step_s = seconds / steps, win_seconds / win_steps
        loss = probe_s - (tokens / steps) * win_seconds / win_tokens
        return max(1, math.ceil((loss / PROBE_SHARE - probe_s) / win_step_s))


class BatchAllocator:
    """Per-row budgets under one batch width. A batched step costs what its widest row costs: every row is padded to
    T = 1 + max nodes. After the rows propose, each keeps its highest-valued nodes (chance of lying on the accepted
    path, from one `AcceptanceModel` that every row's verified trees teach), at most N of them, N chosen to maximise

        (active rows + sum over rows of the values kept) / t(1 + N)

    where t(T) is the measured seconds of a batched step of width T (scoring, acceptance, commit): a decayed mean per
    width (per bucket where the cache runs a step at the next of its graphs' widths: widths 5-8 cost what 8 costs,
    so a tree of 7 nodes is never cut to 5), a least-squares line through them for widths not yet measured (before
    a second width is measured: flat, the optimistic guess, which the first wide step corrects). N >= 1: a
    speculative step keeps every row's best node, so the acceptance model keeps learning (cut to nothing, it would
    never see a draft again); whether to speculate at all is the `BatchGate`'s choice, on measured rates. Values
    fall along paths and with the rank among siblings, so a kept node's parent and earlier siblings are kept: a
    trimmed sampled tree is still verified exactly (recursive rejection needs them)."""

    def __init__(self, max_depth: int = 32, decay: float = 0.8, buckets: Sequence[int] | None = None):
        from specdec.controllers.acceptance import AcceptanceModel

        self.acceptance = AcceptanceModel(max_depth)
        self.decay = decay
        self.buckets = sorted(buckets or ())  # the widths a step really runs at (graphs), a width rounded up to one
        self.sums: dict[int, list[float]] = {}  # width -> decayed (seconds, weight)
        self.trimmed = 0

    def _bucket(self, width: int) -> int:
        return next((bucket for bucket in self.buckets if bucket >= width), width)

    def observe_cost(self, width: int, seconds: float) -> None:
        kept = self.sums.setdefault(self._bucket(width), [0.0, 0.0])
        kept[0], kept[1] = kept[0] * self.decay + seconds, kept[1] * self.decay + 1.0

    def observe_tree(self, tree: DraftTree, accepted_nodes: Sequence[int]) -> None:
        if len(tree):
            self.acceptance.observe(tree.host_parents, accepted_nodes)

    def cost(self, widths: Sequence[int]) -> list[float]:
        """Predicted seconds of a step of each width (that of its bucket): measured means, the weighted line
        elsewhere."""
        widths = [self._bucket(w) for w in widths]
        means = {w: s / n for w, (s, n) in self.sums.items() if n > 0}
        if not means:
            return [1.0] * len(widths)
        if len(means) == 1:
            (only,) = means.values()
            return [means.get(w, only) for w in widths]
        weight = {w: self.sums[w][1] for w in means}
        total = sum(weight.values())
        mean_w = sum(weight[w] * w for w in means) / total
        mean_t = sum(weight[w] * t for w, t in means.items()) / total
        spread = sum(weight[w] * (w - mean_w) ** 2 for w in means)
        slope = max(sum(weight[w] * (w - mean_w) * (t - mean_t) for w, t in means.items()) / spread, 0.0)
        return [means[w] if w in means else max(mean_t + slope * (w - mean_w), 1e-9) for w in widths]

    def allocate(self, trees: Sequence[DraftTree | None]) -> list[DraftTree | None]:
        """The rows' trees (None: an idle row) cut to the width of the best expected tokens per second."""
        active = [tree for tree in trees if tree is not None]
        widest = max((len(tree) for tree in active), default=0)
        if not widest:
            return list(trees)
        orders, gains = [], numpy.zeros(widest + 1)
        shapes: dict[tuple[int, ...], tuple[list[int], numpy.ndarray]] = {}  # rows' trees often share a shape
        for tree in active:
            found = shapes.get(tree.host_parents)
            if found is None:
                values = self.acceptance.values(tree.host_parents).tolist() if len(tree) else []
                order = sorted(range(len(values)), key=lambda node: -values[node])  # stable: parents, elder siblings
                found = shapes[tree.host_parents] = (order, numpy.cumsum([values[node] for node in order]))
            order, kept = found
            orders.append(order)
            gains[1:len(kept) + 1] += kept
            gains[len(kept) + 1:] += kept[-1] if len(kept) else 0.0
        seconds = numpy.asarray(self.cost(range(1, widest + 2)))
        best = max(int(numpy.argmax((len(active) + gains) / seconds)), 1)
        out, orders = [], iter(orders)
        for tree in trees:
            if tree is None:
                out.append(None)
                continue
            order = next(orders)
            if best >= len(tree):
                out.append(tree)
                continue
            self.trimmed += len(tree) - best
            out.append(subtree(tree, order[:best]))
        return out


@dataclass
class _Row:
    """One sequence in a row of the batch."""

    index: int              # its place in the caller's list of prompts
    prompt_ids: list[int]
    params: object
    rule: object
    drafter: object
    controller: object
    generator: torch.Generator | None
    committed: list[int]
    lent: bool = False      # `committed` was handed to its drafter: the next step's tokens go into a new list
    generated: list[int] = field(default_factory=list)
    history: list = field(default_factory=list)
    misses: int = 0         # its drafts in a row (empty ones too) that had no token accepted
    drafted: bool = False   # its drafter was asked this step
    sit_out: int = 0        # speculative steps it still skips drafting (`ROW_BACKOFF`)
    stats: object = None
    started: float = 0.0
    text: object = None     # its `_TextStream`


PHASES = ("draft", "allocate", "score", "accept", "commit", "bookkeeping")


@dataclass
class BatchStats:
    """One batched decode's steps (`SpeculativeGenerator.batch_stats` after a batched `generate`): how many steps
    speculated, the rows they carried, the tokens committed, and the wall seconds of each phase summed over the steps
    of each kind ("speculative", "plain"). A phase's seconds are host time, except that `score` waits for the step's
    device work where it reads the argmax (a greedy batch) and `accept` where it reads logits (a sampled one).
    bookkeeping: the rows' drafter and controller observations, statistics, stopping rules and chunks. `starts`: the
    rows started and the host seconds outside the steps that starting them took (their set-up; their prefills), and on
    a GPU the prefills' device seconds (CUDA events, read when the batch ends: no sync in the loop)."""

    steps: dict[str, int] = field(default_factory=lambda: {"speculative": 0, "plain": 0})
    row_steps: dict[str, int] = field(default_factory=lambda: {"speculative": 0, "plain": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"speculative": 0, "plain": 0})
    seconds: dict[str, dict[str, float]] = field(
        default_factory=lambda: {kind: dict.fromkeys(PHASES, 0.0) for kind in ("speculative", "plain")})
    widths: dict[int, int] = field(default_factory=dict)  # a speculative step's width (1 + nodes) -> steps
    starts: dict[str, float] = field(default_factory=lambda: {"rows": 0, "prefill_s": 0.0, "setup_s": 0.0,
                                                              "prefill_gpu_s": 0.0})
    # rows started, the host seconds of their set-up (drafter, controller) and prefills, the prefills' device seconds

    def per_step_ms(self, kind: str) -> dict[str, float]:
        """Mean milliseconds of each phase over the steps of `kind`."""
        steps = self.steps[kind]
        return {phase: 1000 * seconds / steps if steps else 0.0 for phase, seconds in self.seconds[kind].items()}

    def as_dict(self) -> dict:
        return {"steps": dict(self.steps), "row_steps": dict(self.row_steps), "tokens": dict(self.tokens),
                "per_step_ms": {kind: self.per_step_ms(kind) for kind in self.steps},
                "widths": dict(sorted(self.widths.items())), "starts": dict(self.starts)}


PLAIN_RUN = 8  # plain greedy steps a batch runs on the device between host reads (batched `ar`, the gate's plain
# steps); a row that ends mid-run wastes the rest of it (its slot refills after), ~3% of a 128-token answer
ROW_BACKOFF = 16  # a row whose drafts keep missing sits out 1, 2, 4, ... up to this many speculative steps


STEP_SLACK = 64  # cache slots past a row's last token: a step's padding queries write there (widths up to 33)
PREFILL_PAD = 1.25  # rows prefilled in one forward only while its padded tokens are at most this many times the real
PREFILL_TOKENS = 8192  # ... and its padded tokens at most this many


def prefill_runs(backend: BatchedStaticBackend, starts: Sequence[tuple[int, Sequence[int]]]) -> None:
    """Prefill the rows `starts` = [(row, token ids)] (rows ascending): adjacent rows together while the padding
    and the forward's size stay within PREFILL_PAD and PREFILL_TOKENS, else apart."""
    run: list[tuple[int, Sequence[int]]] = []
    for row, token_ids in [*starts, (-1, ())]:
        grown = run + [(row, token_ids)]
        width, real = max(len(ids) for _, ids in grown), sum(len(ids) for _, ids in grown)
        if run and (row != run[-1][0] + 1 or width * len(grown) > max(PREFILL_PAD * real, 1)
                    or width * len(grown) > PREFILL_TOKENS):
            backend.prefill_rows(run[0][0], [ids for _, ids in run])
            run = []
        run.append((row, token_ids))


_BATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a generator's backend -> its batched caches
KEPT_BATCHED = 3  # batched caches kept per backend (the latest used): a bench's batch sizes reuse theirs


def _reused_backend(single, batch_size: int, max_len: int):
    """A batched cache for the model of `single` (the generator's backend) with every row empty: one kept from an
    earlier batch of this size that holds max_len slots a row (its graphs captured once), else a new one; native
    where `single` runs the native forward."""
    from specdec.batch_native import batched_backend

    kept = _BATCHED.setdefault(single, {})
    fits = [key for key in kept if key[0] == batch_size and max_len <= key[1]]
    key = min(fits, key=lambda k: k[1]) if fits else (batch_size, max_len)
    backend = kept.pop(key, None)
    if backend is None:
        while len(kept) >= KEPT_BATCHED:
            kept.pop(next(iter(kept)))
        backend = batched_backend(single.model, batch_size, native=getattr(single, "native", False),
                                  max_len=max_len)
        backend.capture_all()  # graphs now, before any row is prefilled
    kept[key] = backend  # the latest used last
    backend.lengths = [0] * batch_size
    return backend


def kept_policy(gen, backend: BatchedCache, allocate: bool) -> tuple[BatchGate, BatchAllocator | None]:
    """The batch gate and allocator of `gen`'s batches of this size: what they measured (the rates of speculative and
    plain steps, each width's seconds, the drafts' acceptance) carries over to its next batched call, as the
    controllers' cost model does across generations. A short batch then starts from its measurements instead of
    probing: 48 rows of 128 tokens are ~130 steps, and two losing probes cost ~5% of them."""
    key = (backend.batch_size, allocate)
    if key not in gen.batch_policies:
        gen.batch_policies[key] = (BatchGate(), BatchAllocator(buckets=backend.step_widths) if allocate else None)
    return gen.batch_policies[key]


def batch_proposer(gen, backend: BatchedCache):
    """The drafter family's proposer for a whole batch (`Drafter.batch_proposer`: e.g. the `model` drafter's chains,
    one draft forward per depth for all rows), made from the generator's own drafter; None: rows propose alone."""
    make = getattr(gen.drafter, "batch_proposer", None)
    if make is None:
        return None
    native = getattr(gen.backend, "native", None) is not None  # the draft's own native forward, never the target's
    return make(backend.batch_size, backend.max_len, gen.target_view, native=native)


def decode_batch(gen, prompts: Sequence, batch_size: int, options: dict, plain: bool = False,
                 allocate: bool = True) -> list:
    """`SpeculativeGenerator.generate(prompts, batch_size=B)`: up to B rows at once (module docstring); returns
    one `GenerationOutput` per prompt, in order. Every prompt is checked before any is decoded (errors name it).
    plain: batched autoregressive decoding (no drafter: every step one token per row), the baseline.
    allocate: cut the rows' trees to the batch width of the best expected tokens per second (`BatchAllocator`);
    False verifies every row's whole proposal (the rows' own controllers alone set the budgets)."""
    steps = batch_steps(gen, prompts, batch_size, options, plain, allocate)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def batch_steps(gen, prompts: Sequence, batch_size: int, options: dict, plain: bool = False,
                allocate: bool = True, stream_text: bool = False) -> Iterator:
    """`decode_batch` as the steps happen (`SpeculativeGenerator.stream(prompts, batch_size=B)`): yields a
    `StreamChunk` per row per step, its `index` the prompt's place in `prompts` (text only with stream_text, a
    row's closing text as a last chunk of no tokens); returns the outputs, in order. A row's chunks are yielded
    after the step's bookkeeping: what the caller does between them is not counted as the step's cost."""
    import time

    from specdec.controllers import StepStats, make_controller
    from specdec.drafters import DraftContext, make_drafter
    from specdec.generator import GenerationOutput, GenerationStats, StreamChunk, _TextStream
    from specdec.sampling import make_generator
    from specdec.tree import max_depth
    from specdec.verify import VerifyResult

    if not plain and (gen._drafter_spec is None or gen._controller_spec is None):
        raise ValueError("batched decoding gives every row its own drafter and controller: pass them by name or "
                         "spec (drafter='ngram', controller='heuristic'), not as objects")
    prepared = []
    for number, prompt in enumerate(prompts):
        try:
            prepared.append(gen._prepare(prompt, **options))
        except (ValueError, TypeError) as error:
            raise type(error)(f"prompt {number}: {error}") from None
    # each row's cache holds the longest prompt and its new tokens (+ the widest step), not the model's whole window
    longest = max(len(prompt_ids) + rule.limit for prompt_ids, _, rule in prepared) + STEP_SLACK
    window = context_window(gen.backend.model.config)
    backend = _reused_backend(gen.backend, min(batch_size, len(prepared)),
                              min(longest, window) if window else longest)
    rows: list[_Row | None] = [None] * backend.batch_size
    outputs: list = [None] * len(prepared)
    waiting = list(range(len(prepared)))[::-1]

    def start(slot: int, index: int) -> _Row:
        prompt_ids, params, rule = prepared[index]
        if params.seed is not None:  # prompt i samples with seed + i: a batch of one prompt gives different samples
            params = dataclasses.replace(params, seed=params.seed + index)
        drafter, controller = ((None, make_controller("static:max_depth=0,max_nodes=0")) if plain else
                               (make_drafter(gen._drafter_spec), make_controller(gen._controller_spec)))
        row = _Row(index, prompt_ids, params, rule, drafter, controller, make_generator(params, backend.device),
                   list(prompt_ids), stats=GenerationStats(), started=time.perf_counter(),
                   text=_TextStream(gen.tokenizer if stream_text else None))
        if not plain:
            _call(row, "reset")
        row.stats.drafter_version = getattr(drafter, "version", None)
        return row

    def finish(row: _Row, end: int) -> str:
        """The row's output; returns its closing text (what the text stream held back)."""
        generated = row.generated[:end]
        row.stats.new_tokens, row.stats.stop_reason = len(generated), row.rule.reason
        row.stats.wall_s = time.perf_counter() - row.started
        outputs[row.index] = GenerationOutput(list(row.prompt_ids), generated, gen._decode(generated), row.stats)
        return row.text.push(generated, final=True)

    def _failed(row: _Row, error: Exception) -> None:
        if row.stats.drafter_errors == 0:
            import warnings

            warnings.warn(f"prompt {row.index}: drafter {type(row.drafter).__name__} failed "
                          f"({type(error).__name__}: {error}); a plain step instead", RuntimeWarning, stacklevel=3)
        row.stats.drafter_errors += 1

    def _call(row: _Row, method: str, *args):
        try:
            return getattr(row.drafter, method)(*args)
        except Exception as error:  # noqa: BLE001 - a drafter failure costs its row one plain step
            _failed(row, error)
            return None

    def context(row: _Row) -> DraftContext | None:
        """The row's draft context under its controller's budget (None: the budget is 0, or the row sits out)."""
        row.drafted = False
        if row.sit_out:
            row.sit_out -= 1
            return None
        budget = gen._clamp(row.controller.budget(row.history), len(row.committed),
                            row.rule.limit - len(row.generated))
        if budget.max_nodes == 0 or budget.max_depth == 0:
            return None
        row.drafted = row.lent = True  # the drafter may keep this list (a new one takes the step's tokens)
        return DraftContext(row.committed, budget, row.params, gen.target_view)

    def checked(row: _Row, ctx: DraftContext | None, tree) -> DraftTree:
        problem = None if tree is None else gen._tree_problem(tree, ctx.budget)
        if problem:
            _failed(row, ValueError(problem))
        return empty if tree is None or problem else tree

    def back_off(row: _Row, outcome: RowOutcome) -> None:
        """A row whose drafts missed twice running (no token accepted, or nothing drafted) sits out the next 1, 2,
        4, ... speculative steps (up to ROW_BACKOFF; its drafter's and its tree's host time spared), then drafts
        again; a hit resets it."""
        if outcome.accepted_nodes:
            row.misses = 0
        elif row.drafted:
            row.misses += 1
            if row.misses >= 2:
                row.sit_out = min(1 << (row.misses - 2), ROW_BACKOFF)

    def propose_all() -> list[DraftTree | None]:
        """Every row's tree: from the batch's proposer (one call for all rows) where the drafter has one, else from
        each row's drafter. A proposer that raises costs its rows one plain step."""
        contexts = [None if row is None else context(row) for row in rows]
        if proposer is None:
            trees = [None if ctx is None else _call(row, "propose", ctx) for row, ctx in zip(rows, contexts)]
        else:
            try:
                trees = proposer.propose(contexts)
            except Exception as error:  # noqa: BLE001 - as a row's drafter failing: plain steps, nothing lost
                for row, ctx in zip(rows, contexts):
                    if ctx is not None:
                        _failed(row, error)
                trees = [None] * len(rows)
        return [None if row is None else checked(row, ctx, tree) for row, ctx, tree in zip(rows, contexts, trees)]

    stats = gen.batch_stats = BatchStats()
    prefill_events = [] if backend.device.type == "cuda" else None  # (begun, ended) CUDA events of each prefill
    proposer = None if plain else batch_proposer(gen, backend)
    empty = DraftTree.empty()  # one for every row's plain step (a tree is immutable)
    gate, allocator = (None, None) if plain else kept_policy(gen, backend, allocate)
    while waiting or any(rows):
        free = [slot for slot in range(backend.batch_size) if rows[slot] is None][:len(waiting)]
        if free:  # the next prompts, shortest in the first free row: similar lengths side by side, fewer pads
            started = time.perf_counter()
            starting = sorted((waiting.pop() for _ in free), key=lambda index: len(prepared[index][0]))
            for slot, index in zip(free, starting):
                rows[slot] = start(slot, index)
                if proposer is not None:
                    proposer.release(slot)
            prefilled = time.perf_counter()
            timing = prefill_events is not None and (torch.cuda.Event(enable_timing=True),
                                                     torch.cuda.Event(enable_timing=True))
            if timing:
                timing[0].record()
            prefill_runs(backend, [(slot, rows[slot].prompt_ids[:-1]) for slot in free])
            if timing:  # its device time, read when the batch ends: no sync here
                timing[1].record()
                prefill_events.append(timing)
            stats.starts["rows"] += len(free)
            stats.starts["setup_s"] += prefilled - started
            stats.starts["prefill_s"] += time.perf_counter() - prefilled
        step_started = time.perf_counter()
        speculative = gate is not None and gate.speculate()
        trees = propose_all() if speculative else [None if row is None else empty for row in rows]
        drafted = time.perf_counter()
        if speculative and allocator is not None:
            trees = allocator.allocate(trees)
        verify_started = time.perf_counter()
        greedy = all(row is None or row.params.greedy for row in rows)  # then one device read for every row
        roots = [None if row is None else row.committed[-1] for row in rows]
        run = 1 if speculative or not greedy else min(
            PLAIN_RUN, max(row.rule.limit - len(row.generated) for row in rows if row is not None),
            backend.run_room(roots))
        if run > 1:  # plain greedy steps on the device, one read for all (a row's tokens past its end are cut)
            ran = backend.plain_run(roots, run)
            outcomes = [None if tokens is None else RowOutcome([], tokens[:-1], tokens[-1], None) for tokens in ran]
            scored_at = accepted_at = committed_at = time.perf_counter()
        else:
            scored = backend.score(roots, trees, argmax=greedy, keep_logits=speculative)  # plain: read at once
            logits, best = scored if greedy else (scored, [None] * len(rows))
            scored_at = time.perf_counter()
            outcomes = [None if row is None else RowOutcome([], [], best[b][0], None) if greedy and not speculative
                        else accept_row(trees[b], logits[b], row.params, row.generator, best[b])
                        for b, row in enumerate(rows)]  # a plain greedy row: its root's argmax
            accepted_at = time.perf_counter()
            backend.commit([None if outcome is None else outcome.accepted_nodes for outcome in outcomes])
            committed_at = time.perf_counter()
        width = 1 + max(len(tree) for tree in trees if tree is not None)
        if allocator is not None and run == 1:
            allocator.observe_cost(width, committed_at - verify_started)
        committed_now, chunks = 0, []
        for slot, (row, tree, outcome) in enumerate(zip(rows, trees, outcomes)):
            if row is None:
                continue
            new_tokens = outcome.accepted_tokens + [outcome.bonus_token]
            if speculative and row.drafted:  # plain steps (the gate's, or a row sitting out) are not the row's
                _call(row, "observe", VerifyResult(tree, outcome.accepted_nodes, outcome.accepted_tokens,
                                                   outcome.bonus_token, outcome.logits))
                step = StepStats(len(tree), max_depth(tree), len(outcome.accepted_nodes), tree=tree,
                                 accepted_nodes=tuple(outcome.accepted_nodes), proposed_nodes=len(tree))
                row.history.append(step)
                row.controller.observe(step)
                if allocator is not None:
                    allocator.observe_tree(tree, outcome.accepted_nodes)
                back_off(row, outcome)
            row.stats.target_forwards += run
            row.stats.drafted_nodes += len(tree)
            row.stats.accepted_hist[len(outcome.accepted_nodes)] += run
            before = len(row.generated)
            row.generated += new_tokens
            if row.lent:  # a drafter may keep the list it was shown: the row goes on in a new one
                row.committed, row.lent = row.committed + new_tokens, False
            else:  # plain steps: in place (a copy per row per step cost O(length) host time at 64 rows)
                row.committed += new_tokens
            end = row.rule.cut(row.generated, before)
            committed_now += (len(row.generated) if end is None else end) - before  # the tokens it keeps
            chunks.append(StreamChunk(row.generated[before:end], row.text.push(row.generated, end), row.index))
            if end is not None:
                tail = finish(row, end)
                if tail:
                    chunks.append(StreamChunk([], tail, row.index))
                rows[slot] = None
        step_ended = time.perf_counter()
        if gate is not None:
            gate.observe(speculative, committed_now, step_ended - step_started)
        kind = "speculative" if speculative else "plain"
        stats.steps[kind] += 1
        stats.row_steps[kind] += run * (len(outcomes) - outcomes.count(None))
        stats.tokens[kind] += committed_now
        if speculative:
            stats.widths[width] = stats.widths.get(width, 0) + 1
        phases = stats.seconds[kind]
        for phase, begun, ended in (("draft", step_started, drafted), ("allocate", drafted, verify_started),
                                    ("score", verify_started, scored_at), ("accept", scored_at, accepted_at),
                                    ("commit", accepted_at, committed_at), ("bookkeeping", committed_at, step_ended)):
            phases[phase] += ended - begun
        yield from chunks
    if prefill_events:
        prefill_events[-1][1].synchronize()
        stats.starts["prefill_gpu_s"] = sum(begun.elapsed_time(ended) for begun, ended in prefill_events) / 1000
    return outputs
