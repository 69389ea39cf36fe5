"""Where a model-based drafter (`model`, `early_exit`) keeps its own KV cache, behind one small interface:

    kv.length                      rows cached
    kv.keep(n)                     drop the rows from n on (keep(0): a new sequence)
    kv.move(rows, start)           copy the rows `rows` (in order) to [start, start + len(rows)) in every layer
    kv.run(ids, positions, prefix, block, last_only) -> (T, V) logits
                                   feed T tokens after the cached rows; each sees the rows < `prefix` and, of the
                                   block [prefix, length + T), those its row of `block` ((T, length - prefix + T)
                                   host bool) allows; block None = causal over the new tokens (prefix = length)
    kv.greedy_chain(token, position, count) (GraphKV) -> (count, 2) [top probability, id] of `count` steps, each
                                   step's top token the next one's input, on the device
    kv.layer(i) -> (keys, values)  layer i's cached rows, (1, Hkv, length, D) each

`DynamicKV`: a transformers `DynamicCache` (specdec's `GrowingCache`: appends in place), run through the drafter's own
forward (HF's eager modules).
`GraphKV`: the static cache of a `GraphBackend`; every run is a bucketed step, a CUDA graph replay on the GPU
(the same code eagerly elsewhere).
"""

from __future__ import annotations

from typing import Callable

import torch
from specdec.backends.graph import causal_block
from specdec.backends.growing_cache import GrowingCache
from specdec.backends.hf import move_cache_rows
from specdec.backends.static import move_buffer_rows

# forward(ids, positions, 4D float mask or None = causal, cache, last_only) -> (T, V) logits
Forward = Callable[[list[int], list[int], "torch.Tensor | None", object, bool], torch.Tensor]


class DynamicKV:
    def __init__(self, forward: Forward, dtype: torch.dtype):
        self.cache, self.forward, self.dtype = GrowingCache(), forward, dtype

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def keep(self, length: int) -> None:
        if length == 0:
            self.cache = GrowingCache()
        elif self.length > length:
            self.cache.crop(length - self.length)

    def move(self, rows: list[int], start: int) -> None:
        if not _in_place(rows, start):
            move_cache_rows(self.cache, rows, start)

    def run(self, token_ids: list[int], positions: list[int], prefix: int, block: torch.Tensor | None,
            last_only: bool = False) -> torch.Tensor:
        if block is None:
            mask = None  # plain causal: let the model build it
        else:
            allowed = torch.cat([torch.ones(block.shape[0], prefix, dtype=torch.bool), block], 1)
            mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill(~allowed, torch.finfo(self.dtype).min)
            mask = mask[None, None]
        return self.forward(token_ids, positions, mask, self.cache, last_only)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.layers[index].keys, self.cache.layers[index].values


class GraphKV:
    """model: what the `GraphBackend` captures (a causal LM, or `early_exit`'s first layers wrapped as one);
    attention: its attention for square steps ("auto": specdec's tree kernel on CUDA); width: the most frontier
    queries of one draft step (their shapes are captured up front on CUDA); native: run the steps through
    `NativeBackend`'s own Llama-family forward (None: where it can, on CUDA)."""

    def __init__(self, model, attention: str | None, width: int, native: bool | None = None):
        from specdec.backends.graph import GraphBackend
        from specdec.backends.native import NativeBackend, unsupported_reason

        if native is None:
            native = model.device.type == "cuda" and unsupported_reason(model) is None
        self.runner = NativeBackend(model) if native else GraphBackend(model, attention=attention)
        self.state = self.runner.new_state()  # on CUDA: captures the square buckets (catch-up, first frontier)
        if self.runner.device.type == "cuda":  # and the frontier shapes: up to `width` queries over a wider block
            buckets = self.runner.buckets
            sizes = buckets[: next((i + 1 for i, size in enumerate(buckets) if size >= width), len(buckets))]
            self.runner.capture_all([(size, wide) for size in sizes for wide in buckets if wide > size])

    @property
    def length(self) -> int:
        return self.state.length

    def keep(self, length: int) -> None:
        self.state.length = min(self.state.length, length)

    def move(self, rows: list[int], start: int) -> None:
        if not _in_place(rows, start):  # (a chain's accepted rows always are: no index copy to the device)
            move_buffer_rows(self.state.buffer, rows, start)

    def run(self, token_ids: list[int], positions: list[int], prefix: int, block: torch.Tensor | None,
            last_only: bool = False) -> torch.Tensor:
        if block is None and last_only and prefix == self.state.length and len(token_ids):
            return self.runner.prefill_chunks(self.state, token_ids)[-1:]  # a catch-up: the backend's prefill steps
        if block is None:
            block = causal_block(len(token_ids))
        # a catch-up from an empty cache is a prefill: past the largest bucket it runs eagerly without a warning
        logits = self.runner.score_block(self.state, token_ids, positions, prefix, block, warn=prefix > 0)
        return logits[-1:] if last_only else logits

    def greedy_chain(self, token: torch.Tensor, position: int, count: int) -> torch.Tensor:
        """`count` greedy steps from `token` ((1,) on the device, at `position`) without a host read:
        `GraphBackend.greedy_chain`. Returns (count, 2) float64 [top probability, id] rows."""
        return self.runner.greedy_chain(self.state, token, position, count)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.state.buffer[index, 0, ..., : self.length, :],
                self.state.buffer[index, 1, ..., : self.length, :])


def _in_place(rows: list[int], start: int) -> bool:
    """Whether moving `rows` to [start, start + len(rows)) would copy each row onto itself."""
    return rows == list(range(start, start + len(rows)))
