"""Batched decoding on the native forward: `BatchedStaticBackend`'s contract (prefill rows, score every row's tree in
one step, commit each row's path) on `NativeLlama`, with per-row tree attention and a CUDA graph per step width.

Layout: each layer's KV is (Hkv, B * S, D), row b in slots [b S, (b + 1) S) (`BatchRows`), so the native kernels
that write the cache (rotary + KV write at flat slots, fused into the qkv product) run as for one sequence, and the
tree-attention kernel reads a strided (B, Hkv, S, D) view with each row's own prefix length from a (B,) device
tensor and its own (T, T) tree mask: no padding of the KV to the longest row, one launch for all rows. Attention
splits the prefix into chunks of a fixed size (SPLIT_KEYS), so a row's numbers depend on its own keys only, not on
its neighbours or the batch size.

A step of width T (the widest row's nodes + 1, rounded up to a bucket of WIDTHS on CUDA) runs the whole batch:
tokens, positions, write slots and prefix lengths in one int64 copy, the masks in one bool copy, then one graph
replay (forward, LM head over all B * T queries, their argmax; every width captured when the cache is made,
`capture_all`). Greedy decoding reads the argmax in one device read; per-row logits are views into the graph's
output, copied on speculative steps (a drafter may keep them past the next replay). Without CUDA (tests under the
Triton interpreter) the same inputs run eagerly, the LM head on real queries only. `commit` moves each row's
accepted KV with one gather / scatter for all rows and layers (`BatchedCache`).

`batched_backend(model, B, native=...)` picks it where `NativeLlama` runs the model, else the HF-module backend.
"""

from __future__ import annotations

from typing import Sequence

import numpy
import torch
from transformers import PreTrainedModel

from specdec.backends.native import BatchRows, NativeLlama, unsupported_reason
from specdec.batch import BatchedCache, BatchedStaticBackend
from specdec.kernels.tree_attention import kernel_available
from specdec.tree import DraftTree, depth_list, host_ancestor_mask

SPLIT_KEYS = 512  # attention's prefix chunk: fixed, so rows do not depend on each other's lengths
WIDTHS = (1, 2, 4, 8, 12, 16, 24, 32)  # step widths captured as graphs (T = nodes + 1, rounded up); wider: eager


class NativeBatchedBackend(BatchedCache):
    """The target's KV for `batch_size` rows on `NativeLlama`; `lengths[b]` = committed tokens cached in row b."""

    def __init__(self, model: PreTrainedModel, batch_size: int, max_len: int | None = None,
                 native: NativeLlama | None = None, graphs: bool = True):
        reason = unsupported_reason(model)
        if reason is None and not kernel_available(model.device):
            reason = "Triton or CUDA is unavailable"
        if reason is not None:
            raise ValueError(f"the native batched backend cannot run {type(model).__name__}: {reason}")
        super().__init__(model, batch_size, max_len)
        self.native = native if native is not None and native.cos.shape[0] >= self.max_len else NativeLlama(
            model, self.max_len)
        config = model.config.get_text_config()
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.buffer = torch.zeros((config.num_hidden_layers, 2, 1, kv_heads, batch_size * self.max_len,
                                   self.native.head_dim), dtype=self.dtype, device=self.device)
        self.graphs = graphs and self.device.type == "cuda"
        self.step_widths = WIDTHS if self.graphs else None
        self._steps: dict[int, _BatchStep] = {}
        self._single = None  # the rows' prefiller (`_prefiller`), made at its first use
        self.prefill_single = self.graphs  # prefill rows on the single-sequence backend's graphs (not worth it eager)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def capture_all(self) -> None:
        """Capture every step width's graph now (CUDA; a fresh cache: the captures write KV at rows' first slots),
        so no step of a timed batch pays for a capture."""
        if not self.graphs:
            return
        for width in WIDTHS:
            if width <= self.max_len and width not in self._steps:
                step = self._steps[width] = _BatchStep(self, width)
                step.capture()

    def _prefiller(self):
        """The single-sequence native backend the rows' prompts are prefilled on (sharing this forward's weights;
        its graphs are captured at its first use)."""
        if self._single is None:
            from specdec.backends.native import NativeBackend

            self._single = NativeBackend(self.model, self.max_len, native=self.native)
        return self._single

    def _step(self, width: int) -> _BatchStep:
        """The graph step of `width` (captured at its first run where `capture_all` did not)."""
        step = self._steps.get(width)
        if step is None:
            step = self._steps[width] = _BatchStep(self, width)
        return step

    def _rows(self, first: int) -> BatchRows:
        return BatchRows(first, self.max_len, SPLIT_KEYS)

    @torch.inference_mode()
    def prefill_rows(self, first: int, prompts: Sequence[Sequence[int]]) -> None:
        """Rows first, first + 1, ... now hold `prompts` (each a prompt but its last token). With graphs, each row
        through the single-sequence native backend's captured prefill chunks (`prefill_single`), its KV then copied
        into the row (one copy): on an H100 one eager forward spent 12-22 ms launching ~300 kernels, whatever the
        length, where its GPU work took ~1 ms. Else in one eager forward padded to the longest (a padding query sees
        only itself and writes past its row's length); no LM head."""
        if self.prefill_single:
            prefiller = self._prefiller()
            for offset, (count, token_ids) in enumerate(zip(self._start_rows(first, prompts), prompts)):
                if count:
                    scratch = prefiller.new_state()  # the prefiller's one cache, emptied
                    prefiller.prefill_chunks(scratch, token_ids)
                    row = (first + offset) * self.max_len
                    self.buffer[..., row: row + count, :].copy_(scratch.buffer[..., :count, :])
            return
        inputs = self._prefill_inputs(first, prompts)
        if inputs is None:
            return
        ids, visible = inputs
        span = torch.arange(ids.shape[1])
        rows = torch.arange(len(prompts))[:, None]
        slots = (first + rows) * self.max_len + span
        self.native.forward(self.buffer, ids.flatten().to(self.device), span.repeat(len(prompts)).to(self.device),
                            slots.flatten().to(self.device), torch.zeros(len(prompts), dtype=torch.long,
                                                                         device=self.device),
                            visible.to(self.device), self._rows(first), keep=torch.empty(0, dtype=torch.long))

    def _inputs(self, roots: Sequence[int | None], trees: Sequence[DraftTree | None], width: int, active: list[int]):
        """Host inputs of a step of width `width`: (ids, positions, slots, prefix) as one (3 B T + B,) int64 array,
        the (B, T, T) bool masks, and each row's real query count. The roots' part in a few numpy operations for
        all rows (a plain step is only that); then each drafted tree's own nodes."""
        batch, size = self.batch_size, self.max_len
        packed = numpy.zeros(3 * batch * width + batch, dtype=numpy.int64)
        ids, positions, slots = (packed[k * batch * width: (k + 1) * batch * width].reshape(batch, width)
                                 for k in range(3))
        prefix = packed[3 * batch * width:]
        masks = numpy.zeros((batch, width, width), dtype=numpy.bool_)
        span = numpy.arange(width)
        masks[:, span, span] = True  # padding queries, idle rows: themselves only
        starts = numpy.zeros(batch, dtype=numpy.int64)  # an idle row: at its row's [0, width), rewritten by its
        starts[active] = [self.lengths[b] for b in active]  # next prefill
        prefix[:] = starts
        slots[:] = (numpy.arange(batch) * size + starts)[:, None] + span
        positions[:] = starts[:, None]
        ids[:, 0] = [0 if root is None else root for root in roots]
        counts = [0] * batch
        shapes: dict[tuple[int, ...], tuple[numpy.ndarray, numpy.ndarray]] = {}
        for b in active:
            tree = trees[b]
            parents = () if tree is None else tree.host_parents
            count = counts[b] = len(parents) + 1
            if not parents:
                continue
            found = shapes.get(parents)
            if found is None:
                found = shapes[parents] = (numpy.array([0] + depth_list(tree)),
                                           host_ancestor_mask(tree, with_root=True).numpy())
            positions[b, :count] += found[0]
            ids[b, 1:count] = tree.host_tokens if tree.host_tokens is not None else tree.tokens.tolist()
            masks[b, :count, :count] = found[1]
        return packed, masks, counts

    @torch.inference_mode()
    def score(self, roots: Sequence[int | None], trees: Sequence[DraftTree | None], argmax: bool = False,
              keep_logits: bool = True):
        """One step over every active row's [root + tree] (None: an idle row) -> per row (N_b + 1, V) logits;
        argmax: -> (those, per row the argmax of each of its queries as a host list: one device read for all).
        keep_logits=False: the rows' logits are views of the step graph's output, valid until the next step (a
        caller that reads them at once, as a plain step's acceptance does); True: a copy."""
        active = [b for b, root in enumerate(roots) if root is not None]
        needed = max(len(trees[b]) + 1 for b in active)
        for b in active:
            if self.lengths[b] + needed > self.max_len:
                raise ValueError(f"row {b}: the cache holds {self.max_len} tokens; this step needs "
                                 f"{self.lengths[b] + needed}")
        width = next((w for w in WIDTHS if w >= needed), needed) if self.graphs else needed
        if max(self.lengths[b] for b in active) + width > self.max_len:  # padding would write into the next row
            width = needed
        packed, masks, counts = self._inputs(roots, trees, width, active)
        if self.graphs and width in WIDTHS:
            logits, best = self._step(width).run(packed, masks)
            return self._rows_out(logits.clone() if keep_logits else logits, counts, width, argmax, best)
        real = [b * width + i for b in active for i in range(counts[b])]
        inputs = torch.from_numpy(packed).to(self.device)
        batch_width = self.batch_size * width
        logits = self.native.forward(self.buffer, inputs[:batch_width], inputs[batch_width: 2 * batch_width],
                                     inputs[2 * batch_width: 3 * batch_width], inputs[3 * batch_width:],
                                     torch.from_numpy(masks).to(self.device), self._rows(0),
                                     keep=torch.tensor(real, device=self.device))
        return self._rows_out(logits, counts, None, argmax)

    @torch.inference_mode()
    def plain_run(self, roots: Sequence[int | None], steps: int) -> list[list[int] | None]:
        """`steps` plain greedy steps with no host read between them: after each, its argmax becomes the next
        step's roots on the device and every position, slot and prefix moves on by one (a width-1 step's inputs are
        only those), so the host builds one step's inputs and reads all the tokens once (B x steps)."""
        self._check_run(roots, steps)
        active = [b for b, root in enumerate(roots) if root is not None]
        batch = self.batch_size
        packed, masks, _ = self._inputs(roots, [None] * batch, 1, active)
        tokens = torch.empty(steps, batch, dtype=torch.long, device=self.device)
        if self.graphs:
            step = self._step(1)
            inputs = step.inputs  # the graph's own: the first step's copy fills it
        else:
            inputs, masks = torch.from_numpy(packed).to(self.device), torch.from_numpy(masks).to(self.device)
            every = torch.arange(batch, device=self.device)
        for index in range(steps):
            if self.graphs:
                best = step.replay() if index else step.run(packed, masks)[1]
            else:
                best = self.native.forward(self.buffer, inputs[:batch], inputs[batch: 2 * batch],
                                           inputs[2 * batch: 3 * batch], inputs[3 * batch:], masks, self._rows(0),
                                           keep=every).argmax(-1)
            tokens[index].copy_(best)
            if index + 1 < steps:  # the next step: these tokens at the next slots and positions
                inputs[:batch].copy_(best)
                inputs[batch:].add_(1)
        for b in active:
            self.lengths[b] += steps
        read = tokens.T.tolist()
        return [read[b] if roots[b] is not None else None for b in range(batch)]

    @torch.inference_mode()
    def commit(self, paths: Sequence[Sequence[int] | None]) -> None:
        """Per active row, its accepted nodes (path order): their KV moves behind the row's root in every layer (one
        gather, one scatter for all rows) and the row's length grows by 1 + len(path). None: an idle row."""
        moves = self._commit_moves(paths, row_slots=self.max_len)  # flat slots: row b's start at b * S
        if moves is not None:
            source, target = (part.flatten().to(self.device) for part in moves)
            layers, _, _, heads, _, dim = self.buffer.shape
            shape = (layers, 2, 1, heads, len(source), dim)
            source = source[None, None, None, :, None].expand(shape)
            target = target[None, None, None, :, None].expand(shape)
            self.buffer.scatter_(4, target, self.buffer.gather(4, source))
        self._advance(paths)


class _BatchStep:
    """The static inputs and CUDA graph of one step width: forward over B x T queries, LM head, argmax."""

    def __init__(self, backend: NativeBatchedBackend, width: int):
        batch, device = backend.batch_size, backend.device
        self.backend, self.width = backend, width
        self.host = torch.zeros(3 * batch * width + batch, dtype=torch.long, pin_memory=True)
        self.host_masks = torch.zeros(batch, width, width, dtype=torch.bool, pin_memory=True)
        self.inputs = torch.zeros_like(self.host, device=device)
        self.masks = torch.zeros_like(self.host_masks, device=device)
        self.copied = torch.cuda.Event()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = self.best = None

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.backend.batch_size * self.width
        inputs = self.inputs
        logits = self.backend.native.forward(self.backend.buffer, inputs[:count], inputs[count: 2 * count],
                                             inputs[2 * count: 3 * count], inputs[3 * count:], self.masks,
                                             self.backend._rows(0))
        return logits, logits.argmax(-1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the step on whatever its static inputs hold (writes KV only at the slots they name)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS handles; rewrites the same slots
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.backend.pool):
            self.logits, self.best = self.forward()

    def run(self, packed: numpy.ndarray, masks: numpy.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        self.copied.synchronize()  # the previous step's copy has left the pinned buffers
        self.host.numpy()[:] = packed
        self.host_masks.numpy()[:] = masks
        self.inputs.copy_(self.host, non_blocking=True)
        self.masks.copy_(self.host_masks, non_blocking=True)
        self.copied.record()
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits, self.best

    def replay(self) -> torch.Tensor:
        """The step again on what its device inputs hold now (`plain_run` moved them on) -> its argmax."""
        self.graph.replay()
        return self.best


def batched_backend(model: PreTrainedModel, batch_size: int, native: bool | NativeLlama = False,
                    max_len: int | None = None):
    """The batched cache for `model`: `NativeBatchedBackend` when `native` (True or the generator's own
    `NativeLlama`) and the model and machine allow it, else `BatchedStaticBackend` (HF's modules)."""
    if native and unsupported_reason(model) is None and kernel_available(model.device):
        return NativeBatchedBackend(model, batch_size, max_len,
                                    native=native if isinstance(native, NativeLlama) else None)
    return BatchedStaticBackend(model, batch_size, max_len)
