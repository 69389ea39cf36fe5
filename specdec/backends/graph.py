"""The fast backend: `StaticBackend`'s preallocated cache, each step replayed as a CUDA graph of a bucketed size.

A step is T queries written at cache slots [L, L+T) (L = `state.length`) that see every slot below a prefix P and,
of the block [P, L+T), the slots their row of a block mask allows. A tree verification is the square case: P = L,
the root and the N nodes as queries, the tree mask as block mask. A drafter growing its own tree on a static cache
(`ModelDrafter(graphs=True)`) writes each new frontier after the nodes it already ran (L > P).

Steps run in the smallest bucket of queries >= T and of block keys >= L+T-P (default 1, 2, 4, ..., 128); unused
query rows are padding (token 0, each sees only itself, its KV lands in the stale tail that no later query sees).
Per bucket, everything the forward reads lives in static device tensors, filled by **one** host-to-device copy of
one pinned buffer:

    [tokens (T) | position ids (T) | P (1) | L - P (1) | block mask (T * width, row-major, 0/1) | parent rows (T)]

and the forward itself derives the rest on the device: the KV write slots and the (1, 1, T, S_max) float mask
(prefix visible, the block through the block mask, the stale tail hidden). For square steps the block mask and P
are also handed to the attention function as keyword arguments (`specdec_tree_mask`, `specdec_prefix_len`), which
transformers passes through to it: with `attn_implementation="specdec_tree"` the Triton kernel reads only the P + T
live keys (P from device memory, so the graph stays valid as the cache grows); any other implementation reads the
4D mask over the whole static cache.

On CUDA the square buckets are captured at the first prefill, other shapes at first use (after two warm-up runs on a
side stream; with specdec's tree attention switched on for the capture only), all sharing one memory pool, and
replayed; elsewhere (CPU tests) the same code runs eagerly, so the padding and masking logic is tested everywhere.
A prefill runs as causal square steps: while more than the largest step bucket is left, the largest prefill size
(default 256, 512: squares captured for prefills only) that fits, then the rest in one step bucket (a 300-token
prompt: 256 + 44 in the 64 bucket, 2 replays; each replay is a few hundred kernel launches whatever its size). A
step that fits no bucket, or whose padding would run past the cache, runs eagerly (correct, slower). The graphs
hold the buffer's addresses, so the backend owns **one** cache: a new `prefill` starts a new sequence on the same
buffer (one sequence at a time, as the generator uses it).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Iterator, Sequence

import numpy
import torch
from transformers import PreTrainedModel

from specdec.backends.static import StaticBackend, StaticState
from specdec.kernels.greedy import greedy_advance
from specdec.kernels.greedy_accept import greedy_accept
from specdec.tree import DraftTree, depth_list, host_ancestor_mask

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL_SIZES = (256, 512)  # squares beyond the step buckets, for prompts (and a draft model's catch-up) only


class _Step:
    """The static tensors and (on CUDA) the graph of one bucket: `size` queries over a block of `width` keys."""

    def __init__(self, backend: GraphBackend, state: StaticState, size: int, width: int):
        device, self.size, self.width = backend.device, size, width
        self.backend, self.state = backend, state
        self.host = torch.zeros(3 * size + 2 + size * width, dtype=torch.long, pin_memory=device.type == "cuda")
        self.inputs = torch.zeros_like(self.host, device=device)
        self.tokens, self.positions = self.inputs[:size], self.inputs[size: 2 * size]
        self.prefix = self.inputs[2 * size]  # 0-d: P
        self.offset = self.inputs[2 * size + 1]  # 0-d: L - P, where in the block the queries are written
        self.block_flat = self.inputs[2 * size + 2: 2 * size + 2 + size * width]
        self.parent_rows = self.inputs[2 * size + 2 + size * width:]  # a verification's node i: its parent's row
        self.offsets = torch.arange(size, device=device)
        self.columns = torch.arange(backend.max_len, device=device)
        self.write_slots = torch.empty(size, dtype=torch.long, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.acceptance: _GreedyAcceptance | None = None  # made at the first `verify_greedy` in this bucket

    def forward(self) -> torch.Tensor:
        """The step on the static tensors: (size, V) logits. Captured as it is; no host reads inside."""
        torch.add(self.offsets, self.prefix + self.offset, out=self.write_slots)
        return self.backend.step_forward(self)

    def fill(self, tokens: Sequence[int], positions: Sequence[int], prefix: int, offset: int,
             block_mask: torch.Tensor, device_tokens: torch.Tensor | None = None,
             parent_rows: Sequence[int] | None = None) -> None:
        """Write the step's inputs into the pinned buffer and copy them to the device in one transfer.
        block_mask: (count, offset + count) host bool; `device_tokens` (already on the device) follow `tokens`;
        parent_rows: a verification's tree, node i's parent row (0 = the root); the rest become -1 (no node).
        The writes go through a numpy view of the buffer: a quarter of the host time of torch's indexing ops."""
        size, width = self.size, self.width
        count, used = block_mask.shape
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the pinned buffer
        host = self.host.numpy()  # the same memory
        host.fill(0)
        host[: len(tokens)] = tokens
        host[size: size + count] = positions
        host[2 * size], host[2 * size + 1] = prefix, offset
        mask = host[2 * size + 2: 2 * size + 2 + size * width].reshape(size, width)
        mask[:count, :used] = block_mask.numpy()
        padding = numpy.arange(count, size)
        mask[padding, numpy.minimum(offset + padding, width - 1)] = 1  # padding rows see one block slot, never NaN
        if parent_rows is not None:
            parents = host[2 * size + 2 + size * width:]
            parents[: len(parent_rows)] = parent_rows
            parents[len(parent_rows):] = -1
        self.inputs.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if device_tokens is not None and len(device_tokens):  # a tree built on the device: its tokens stay there
            self.tokens[len(tokens): len(tokens) + len(device_tokens)].copy_(device_tokens, non_blocking=True)

    @torch.inference_mode()
    def run(self) -> torch.Tensor:
        if self.backend.device.type != "cuda":
            with self.backend.attention_for_capture(square=self.size == self.width):
                return self.forward()  # eagerly, with the attention the graph would have been captured with
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits

    @torch.inference_mode()
    def capture(self) -> None:
        with self.backend.attention_for_capture(square=self.size == self.width):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy inits, cuBLAS handles, Triton compiles; rewrites the same slots
                    self.forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.backend.pool):
                self.logits = self.forward()


class _GreedyAcceptance:
    """A bucket's greedy acceptance on the device, after its verify step: every row's argmax, the tree walk and the
    KV compaction (`specdec.kernels.greedy_accept`), and the outcome's copy to pinned host memory -- on CUDA one
    graph replay (captured with the bucket's step graph by `GraphBackend.capture_all`, else at the bucket's second
    use, its first running the same ops eagerly), then one event."""

    def __init__(self, step: _Step):
        device, size = step.backend.device, step.size
        self.step = step
        self.best = torch.empty(size, dtype=torch.long, device=device)
        self.outcome = torch.zeros(2 * size, dtype=torch.long, device=device)
        self.host = torch.zeros(2 * size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.ready = torch.cuda.Event() if device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _ops(self, logits: torch.Tensor) -> None:
        step = self.step
        torch.argmax(logits, -1, out=self.best)
        greedy_accept(self.best, step.tokens, step.parent_rows, step.prefix, step.state.buffer, self.outcome)
        self.host.copy_(self.outcome, non_blocking=True)

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor) -> None:
        """After the step's forward wrote `logits` ((size, V), the step's static output on CUDA)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._ops(logits)
            if self.ready is not None:  # records only: this step's acceptance ran eagerly just above
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.step.backend.pool):
                    self._ops(logits)
                self.graph = graph
        if self.ready is not None:
            self.ready.record()

    def prepare(self) -> None:
        """Compile and capture before any verification: an eager run that accepts nothing (every parent row -1, so
        no KV row moves), then the capture."""
        self.step.parent_rows.fill_(-1)
        self.launch(self.step.logits)

    def read(self) -> list[int]:
        """The outcome [accepted_len, bonus, accepted nodes (size - 1), their tokens (size - 1)]: the step's one
        host read."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class GreedyVerification:
    """A launched `GraphBackend.verify_greedy`: `logits` (N + 1, V) now; `read()` waits for the outcome and sets
    the state's length to the committed tokens but the bonus (the KV is compacted on the device already)."""

    def __init__(self, acceptance: _GreedyAcceptance, state: StaticState, root_slot: int, logits: torch.Tensor):
        self.acceptance, self.state, self.root_slot, self.logits = acceptance, state, root_slot, logits

    def read(self) -> tuple[list[int], list[int], int]:
        """(accepted nodes, their tokens, bonus token)."""
        outcome = self.acceptance.read()
        accepted, nodes = outcome[0], self.acceptance.step.size - 1
        self.state.length = self.root_slot + 1 + accepted
        return outcome[2: 2 + accepted], outcome[2 + nodes: 2 + nodes + accepted], outcome[1]


class GraphBackend(StaticBackend):
    """`StaticBackend` with bucketed, graph-captured steps. buckets: the step sizes (queries, and block keys) to
    capture; attention: the attention implementation baked into the graphs ("auto": "specdec_tree" where the Triton
    kernel runs on CUDA, else the model's own; None: the model's own); compile: run each step's forward through
    torch.compile before capturing it (kernel fusion; compiles once per bucket); prefill_sizes: larger causal
    squares for prompts only (those not above the largest bucket are ignored)."""

    def __init__(self, model: PreTrainedModel, max_len: int | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, attention: str | None = "auto", compile: bool = False,
                 prefill_sizes: Sequence[int] = PREFILL_SIZES):
        super().__init__(model, max_len)
        # compile: each bucket's forward goes through torch.compile (inductor fuses the many small elementwise
        # kernels of HF's modules) before it is captured; one compilation per bucket shape
        self.forward_fn = model
        if compile:
            from torch import _dynamo  # (`import torch._dynamo` here would make `torch` a local of __init__)

            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 4 * len(buckets))
            self.forward_fn = torch.compile(model, dynamic=False)
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be sizes >= 1, got {buckets!r}")
        if attention == "auto":
            from specdec.kernels.tree_attention import kernel_available, register_tree_attention

            attention = register_tree_attention() if self.device.type == "cuda" and kernel_available(
                self.device) else None
        self.attention = attention
        self.buckets = tuple(sorted(set(buckets)))
        self.prefill_sizes = tuple(sorted(size for size in set(prefill_sizes) if size > self.buckets[-1]))
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self._state: StaticState | None = None
        self._steps: dict[tuple[int, int], _Step] = {}
        self._chains: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # by (count, argmax)
        self.eager_steps = 0  # steps that fit no bucket and ran eagerly

    @contextlib.contextmanager
    def attention_for_capture(self, square: bool = True):
        """Square steps are captured with `attention` (auto: specdec's Triton tree attention on CUDA) and keep it;
        other shapes, and eager calls and other users of the model, see the model's own setting."""
        previous = self.model.config._attn_implementation
        if square and self.attention is not None and self.attention != previous:
            try:
                self.model.set_attn_implementation(self.attention)
            except (ValueError, TypeError, NotImplementedError, AttributeError) as error:
                warnings.warn(f"{type(self.model).__name__} cannot use attention {self.attention!r} ({error}); the "
                              f"graph backend keeps the model's own {previous!r}", RuntimeWarning, stacklevel=4)
                self.attention = None
        try:
            yield
        finally:
            if self.model.config._attn_implementation != previous:
                self.model.set_attn_implementation(previous)

    def step_forward(self, step: _Step) -> torch.Tensor:
        """One step through HF's modules, on the step's static tensors (`write_slots` already set)."""
        size, width = step.size, step.width
        step.state.slots.write_slots = step.write_slots
        block_mask = step.block_flat.view(size, width) != 0
        relative = step.columns - step.prefix  # key slot - P: < 0 prefix, [0, width) the block
        in_block = (relative >= 0) & (relative < width)
        block = block_mask.gather(1, relative.clamp(0, width - 1).expand(size, -1)) & in_block
        visible = (relative < 0) | block
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        # square steps hand P and the (T, T) block mask to the attention function: specdec's Triton kernel reads
        # keys [0, P) unmasked and [P, P + T) through the mask (wherever in the block the queries were written)
        kernel = {"specdec_prefix_len": step.prefix, "specdec_tree_mask": block_mask} if size == width else {}
        out = self.forward_fn(input_ids=step.tokens[None], position_ids=step.positions[None],
                              attention_mask=mask[None, None], use_cache=True,
                              **{self._cache_keyword: step.state.cache}, **kernel)
        return out.logits[0]

    def new_state(self) -> StaticState:
        """The one cache the graphs were captured on, emptied (its stale contents are never visible). On CUDA the
        first call captures every square bucket, so no timed verification pays for a capture."""
        if self._state is None:
            self._state = super().new_state()
            if self.device.type == "cuda":
                self.capture_all()
        self._state.length = 0
        return self._state

    def prefill(self, token_ids: Sequence[int]) -> StaticState:
        """The prompt as a few causal square steps (`prefill_chunks`): graph replays instead of one eager forward
        (whose Python and kernel launches cost ~10-30x more at batch 1)."""
        state = self.new_state()
        self.prefill_chunks(state, token_ids)
        return state

    def prefill_chunks(self, state: StaticState, token_ids: Sequence[int]) -> torch.Tensor | None:
        """Append `token_ids` to `state` causally in as few square steps as the sizes allow (`chunk_sizes`);
        returns the last step's logits (None for no tokens)."""
        sizes, logits, start = self.buckets + self.prefill_sizes, None, 0
        for count in chunk_sizes(len(token_ids), self.buckets[-1], self.prefill_sizes):
            ids, at = token_ids[start: start + count], state.length
            logits = self.score_block(state, ids, range(at, at + count), at, causal_block(count), warn=False,
                                      sizes=sizes)
            start += count
        return logits

    def capture_all(self, shapes: Sequence[tuple[int, int]] | None = None) -> None:
        """Capture these (queries, block keys) buckets, default the square ones and the prefill sizes, that fit
        the cache; by default also the square buckets' greedy acceptance (`verify_greedy`)."""
        for size, width in shapes or [(size, size) for size in self.buckets + self.prefill_sizes]:
            if max(size, width) <= self.max_len:
                step = self._step(size, width)
                if step.graph is None:
                    step.capture()
                if shapes is None and size in self.buckets and step.acceptance is None:
                    step.acceptance = _GreedyAcceptance(step)
                    step.acceptance.prepare()

    def bucket(self, count: int, start: int, sizes: Sequence[int] | None = None) -> int | None:
        """The smallest bucket (of `sizes`, default the step buckets) >= `count` whose slots from `start` stay
        inside the cache; None if none does."""
        return next((size for size in sizes or self.buckets if size >= count and start + size <= self.max_len), None)

    def _step(self, size: int, width: int) -> _Step:
        if (size, width) not in self._steps:
            self._steps[size, width] = _Step(self, self._state, size, width)
        return self._steps[size, width]

    def score_tree(self, state: StaticState, root_token: int, tree: DraftTree) -> torch.Tensor:
        tokens, positions, block, device_tokens = _tree_inputs(state.length, root_token, tree)
        return self.score_block(state, tokens, positions, state.length, block, device_tokens)

    def verify_greedy(self, state: StaticState, root_token: int, tree: DraftTree) -> GreedyVerification | None:
        """`score_tree`, then greedy acceptance and the KV compaction on the device (`verify`'s temperature-0 path
        without a host read of the logits' argmax or a host-launched copy): launched, not waited for. None where
        the step fits no bucket (`verify` then takes the host path)."""
        start, count = state.length, len(tree) + 1
        size = self.bucket(count, start)
        if state is not self._state or size is None:
            return None
        step = self._step(size, size)
        tokens, positions, block, device_tokens = _tree_inputs(start, root_token, tree)
        step.fill(tokens, positions, start, 0, block, device_tokens, numpy.asarray(tree.host_parents) + 1)
        logits = step.run()
        if step.acceptance is None:
            step.acceptance = _GreedyAcceptance(step)
        step.acceptance.launch(logits)
        state.length = start + count  # until `read`
        return GreedyVerification(step.acceptance, state, start, logits[:count].clone())

    def score_block(self, state: StaticState, tokens: Sequence[int], positions: Sequence[int], prefix: int,
                    block_mask: torch.Tensor, device_tokens: torch.Tensor | None = None,
                    warn: bool = True, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """One forward of T = block_mask.shape[0] queries (`tokens`, then `device_tokens`) written at slots
        [L, L + T), L = state.length: each sees the slots < `prefix` and, of the block [prefix, L + T), those its
        row of `block_mask` ((T, L - prefix + T) host bool) allows. Returns (T, V) logits; state.length += T.
        A step past the largest bucket runs eagerly, with a warning unless `warn` is False (a prefill). sizes: the
        query buckets to pick from (default the step buckets; a prefill adds its own squares)."""
        if state is not self._state:
            raise ValueError("this state is not the graph backend's current sequence (a later prefill replaced it)")
        count, used = block_mask.shape
        start, offset = state.length, state.length - prefix
        if start + count > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} tokens; this step needs {start + count}")
        if offset < 0 or used != offset + count:
            raise ValueError(f"block_mask must be (T, length - prefix + T) = ({count}, {offset + count}), "
                             f"got {tuple(block_mask.shape)}")
        size = self.bucket(count, start, sizes)
        width = size if offset == 0 else self.bucket(used, prefix)
        if size is None or width is None:
            if warn and used > self.buckets[-1]:
                _warn_eager(f"a step of {count} queries over {used} block keys exceeds the largest bucket "
                            f"{self.buckets[-1]}")
            self.eager_steps += 1
            return self._eager_block(state, tokens, positions, prefix, block_mask, device_tokens)
        step = self._step(size, max(size, width))
        step.fill(tokens, positions, prefix, offset, block_mask, device_tokens)
        logits = step.run()
        state.length = start + count
        return logits[:count].clone()  # the static output is overwritten by the next replay

    def greedy_chain(self, state: StaticState, token: torch.Tensor, position: int, count: int) -> torch.Tensor:
        """`count` one-query steps from `token` ((1,) device id at `position`, written at slot L = state.length),
        each seeing every cached slot and itself, each step's top token the next step's input -- on the device, one
        graph replay for the whole chain on CUDA (captured once per `count`). Returns (count, 2) float64 rows
        [top probability, its id] of each step's softmax (float64, as a drafter's slot probabilities);
        state.length += count. The steps' static inputs are the one-query bucket's (refilled by its next use)."""
        return self._chain(state, token, position, count, argmax=False)

    def greedy_decode(self, state: StaticState, token: int, count: int) -> list[int]:
        """`count` plain greedy steps from `token` (fed at position state.length, as `decode`): each step's argmax
        (the first maximum of the raw logits, as the reference decoder picks) is the next step's input, on the
        device -- one graph replay and one host read for all `count`, instead of a round trip per token. The same
        logits as `count` calls of `decode` (the same one-query step). Returns the new tokens; state.length +=
        count (the last token is not yet cached, as after `decode`)."""
        return self._chain(state, int(token), state.length, count, argmax=True).tolist()

    def greedy_stream(self, state: StaticState, token: int, count: int, limit: int) -> Iterator[list[int]]:
        """`greedy_decode` chunks of up to `count` tokens from `token`, `limit` tokens in all (fewer where the cache
        ends), pipelined: each chunk is launched before the host reads the one before it (the chain's last step
        leaves the next chunk's input on the device), so the host's read, stop checks and next launch overlap the
        GPU's work instead of idling it between chunks. Yields each chunk's tokens; state.length counts the
        chunks yielded. A caller that stops early leaves at most one chunk launched and unread: it wrote only cache
        slots past state.length (never visible; the next step rewrites them)."""
        start, launched, chunks = state.length, 0, 0
        pinned = self.device.type == "cuda"
        buffers = [torch.empty(count, dtype=torch.long, pin_memory=pinned) for _ in range(2)]

        def launch() -> tuple[torch.Tensor, torch.cuda.Event | None] | None:
            nonlocal launched, chunks
            size = min(count, limit - launched, self.max_len - start - launched)
            if size <= 0:
                return None
            out = self._launch_chain(state, int(token) if launched == 0 else None, start + launched, size, True)
            buffer = buffers[chunks % 2][:size]
            buffer.copy_(out, non_blocking=True)  # CUDA: an async copy to pinned memory, then an event
            done = torch.cuda.Event() if pinned else None
            if done is not None:
                done.record()
            launched, chunks = launched + size, chunks + 1
            return buffer, done

        ahead = launch()
        while ahead is not None:
            (buffer, done), ahead = ahead, launch()  # the next chunk is queued behind this one before the read
            if done is not None:
                done.synchronize()
            new = buffer.tolist()
            state.length += len(new)
            yield new

    def _chain(self, state: StaticState, token: int | torch.Tensor, position: int, count: int, argmax: bool):
        """`greedy_chain` / `greedy_decode`: `token` a host id, or a (1,) device id (it rides in no host copy)."""
        out = self._launch_chain(state, token, state.length, count, argmax, position)
        state.length += count
        return out.clone()  # the static output is overwritten by the next replay

    def _launch_chain(self, state: StaticState, token: int | torch.Tensor | None, slot: int, count: int,
                      argmax: bool, position: int | None = None) -> torch.Tensor:
        """Run (CUDA: launch) the chain of `count` steps from cache slot `slot` and return its static output.
        token None: continue from the inputs a previous argmax chain left on the device (it ended at `slot`)."""
        if state is not self._state:
            raise ValueError("this state is not the graph backend's current sequence (a later prefill replaced it)")
        if 1 not in self.buckets or slot + count > self.max_len:
            raise ValueError(f"a chain of {count} one-query steps from slot {slot} needs the one-query "
                             f"bucket and {slot + count} <= {self.max_len} cache slots")
        step = self._step(1, 1)
        if token is not None:
            on_host = isinstance(token, int)
            step.fill([token] if on_host else [], [slot if position is None else position], slot, 0,
                      causal_block(1), None if on_host else token)
        if self.device.type != "cuda":
            with torch.inference_mode(), self.attention_for_capture():
                return self._chain_steps(step, count, argmax)
        if (count, argmax) not in self._chains:  # (the capture leaves the inputs as they were)
            self._chains[count, argmax] = self._capture_chain(step, count, argmax)
        graph, out = self._chains[count, argmax]
        graph.replay()
        return out

    def chain_forward(self, step: _Step) -> Callable[[], torch.Tensor]:
        """The one-query step's forward for a chain (`step.write_slots` set once before it, then moved on by the
        chain): what depends only on the bucket is computed once here, not per step."""
        return lambda: self.step_forward(step)

    def _chain_steps(self, step: _Step, count: int, argmax: bool) -> torch.Tensor:
        """The chain on the one-query step's static tensors (capturable: no host reads): (count,) ids with
        `argmax` (each step's pick and the inputs' advance one `greedy_advance` launch), else (count, 2) float64
        [top probability, id] rows (a drafter's topk(1) of the softmax)."""
        torch.add(step.offsets, step.prefix + step.offset, out=step.write_slots)
        forward, rows = self.chain_forward(step), []
        picks = torch.empty(count, dtype=torch.long, device=self.device)
        for index in range(count):
            logits = forward()  # (1, V)
            if argmax:  # the last step too: the inputs are then the next chain's (`greedy_stream`)
                greedy_advance(logits[0], picks, index, step.tokens, step.positions, step.prefix, step.write_slots)
                continue
            top = logits.double().softmax(-1).topk(1)
            rows.append(torch.cat([top.values[0], top.indices[0].double()]))
            if index < count - 1:
                step.tokens.copy_(top.indices[0])
                for counter in (step.positions, step.prefix, step.write_slots):  # the step just written is now
                    counter.add_(1)  # part of what the next one sees
        return picks if argmax else torch.stack(rows)

    @torch.inference_mode()
    def _capture_chain(self, step: _Step, count: int, argmax: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs = step.inputs.clone()  # the warm-up advances them; the capture starts from the filled values again
        with self.attention_for_capture():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._chain_steps(step, count, argmax)  # lazy inits; writes only slots the capture rewrites
                step.inputs.copy_(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # records only: the replay starts from the filled inputs
                out = self._chain_steps(step, count, argmax)
        return graph, out

    def _block_ids(self, tokens: Sequence[int], device_tokens: torch.Tensor | None) -> torch.Tensor:
        """A step's token ids on the device: `tokens`, then `device_tokens`."""
        ids = self._ids(list(tokens))
        if device_tokens is not None and len(device_tokens):
            ids = torch.cat([ids, device_tokens.to(self.device)])
        return ids

    def _eager_block(self, state: StaticState, tokens, positions, prefix: int, block_mask: torch.Tensor,
                     device_tokens: torch.Tensor | None) -> torch.Tensor:
        count, used = block_mask.shape
        ids = self._block_ids(tokens, device_tokens)
        visible = torch.zeros(count, self.max_len, dtype=torch.bool)
        visible[:, :prefix] = True
        visible[:, prefix: prefix + used] = block_mask
        return self._run(state, ids, torch.tensor(list(positions), device=self.device), visible.to(self.device))


def _tree_inputs(start: int, root_token: int, tree: DraftTree) -> tuple[list[int], list[int], torch.Tensor,
                                                                      torch.Tensor | None]:
    """A verification's step inputs with the root at slot `start`: (host tokens, positions, block mask, device
    tokens). The drafted ids ride in the one host-to-device copy of the inputs when they are on the host."""
    block = host_ancestor_mask(tree, with_root=True)  # every node sees the root; the root sees itself
    positions = [start] + [start + depth for depth in depth_list(tree)]
    if tree.host_tokens is not None:
        return [root_token, *tree.host_tokens], positions, block, None
    return [root_token], positions, block, tree.tokens


def chunk_sizes(count: int, largest_bucket: int, prefill_sizes: Sequence[int]) -> list[int]:
    """How a prefill of `count` tokens splits: the largest prefill size that fits while more than the largest
    bucket is left (the largest bucket itself when none fits), then the rest. 300 with buckets up to 128 and
    sizes (256, 512): [256, 44]; 700: [512, 128, 60]."""
    chunks, left = [], count
    while left > largest_bucket:
        chunks.append(max((size for size in prefill_sizes if size <= left), default=largest_bucket))
        left -= chunks[-1]
    return chunks + ([left] if left else [])


@functools.lru_cache(maxsize=16)
def causal_block(count: int) -> torch.Tensor:
    """(count, count) lower-triangular host bool, shared between calls: read-only (steps copy it)."""
    return torch.ones(count, count, dtype=torch.bool).tril()


@functools.lru_cache(maxsize=None)
def _warn_eager(reason: str) -> None:
    warnings.warn(f"graph backend runs a step eagerly: {reason}", RuntimeWarning, stacklevel=4)
