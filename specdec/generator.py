"""The public API: `SpeculativeGenerator`.

    gen = SpeculativeGenerator(model, tokenizer=tok, drafter="ngram", controller="heuristic")
    out = gen.generate("def fib(n):", max_new_tokens=64)         # out.text, out.token_ids, out.stats
    for chunk in gen.stream("def fib(n):"): print(chunk.text, end="")

Each step: budget -> draft -> verify (one target forward, lossless acceptance, KV compaction) -> commit -> observe.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Sequence

import torch

from specdec.backends.hf import HFBackend
from specdec.controllers import Budget, Controller, StepStats, make_controller
from specdec.drafters import DraftContext, Drafter, TargetView, make_drafter
from specdec.models import load_model
from specdec.sampling import SamplingParams, make_generator
from specdec.stopping import StopRule
from specdec.timing import PhaseTimer
from specdec.tree import DraftTree, max_depth
from specdec.verify import verify

_EMPTY_TREE = DraftTree.empty()  # a plain autoregressive step (frozen, on the host: shared by every generation)


@dataclass
class GenerationStats:
    """tau = committed tokens per target forward (the bonus included; prefill not counted).
    accepted_hist[k] = steps that accepted k draft tokens. seconds: wall time per phase (prefill, draft, verify,
    accept, commit, observe); wall_s: the whole generation."""

    new_tokens: int = 0
    target_forwards: int = 0
    drafted_nodes: int = 0
    accepted_hist: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    drafter_errors: int = 0
    stop_reason: str | None = None
    controller: dict[str, Any] = field(default_factory=dict)  # the controller's `report()`, where it has one
    drafter_version: int | None = None  # the drafter's weights that served it (online learning), where versioned

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens / wall time of the whole generation, prefill included (as Spec-Bench counts)."""
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"new_tokens": self.new_tokens, "target_forwards": self.target_forwards, "tau": self.tau,
                "tokens_per_s": self.tokens_per_s, "drafted_nodes": self.drafted_nodes,
                "accepted_hist": dict(sorted(self.accepted_hist.items())), "seconds": dict(self.seconds),
                "wall_s": self.wall_s, "drafter_errors": self.drafter_errors, "stop_reason": self.stop_reason,
                "controller": dict(self.controller), "drafter_version": self.drafter_version}


@dataclass(frozen=True)
class GenerationOutput:
    """token_ids: the new tokens only; text: their decoded text (None without a tokenizer)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    stats: GenerationStats


@dataclass(frozen=True)
class StreamChunk:
    """Tokens committed by one step (after stopping rules) and the text they complete; index: which prompt's (the
    place in the list a batched stream was given; 0 for one prompt)."""

    token_ids: list[int]
    text: str
    index: int = 0


class _TextStream:
    """Incremental detokenisation that never emits half a UTF-8 character. Without a tokenizer every delta is "".

    Each push decodes a window from `anchor` (a few tokens before what was already emitted, so a character split
    across tokens and a decoder's handling of the window's first token are the same in both decodes whose
    difference is the delta), not the whole generation: O(new tokens) a step instead of O(length)."""

    CONTEXT = 8  # tokens of left context kept in the window (a UTF-8 character spans at most 4 byte tokens)

    def __init__(self, tokenizer):
        self.tokenizer, self.anchor, self.window_text = tokenizer, 0, ""  # window_text: decode(generated[anchor:done])

    def push(self, generated: list[int], end: int | None = None, final: bool = False) -> str:
        """The text that `generated[:end]` adds to what was emitted."""
        if self.tokenizer is None:
            return ""
        end = len(generated) if end is None else end
        text = self.tokenizer.decode(generated[self.anchor:end], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[len(self.window_text):]
        anchor = max(self.anchor, end - self.CONTEXT)
        if anchor != self.anchor:  # slide the window: the emitted text as the next push's window starts it
            text = self.tokenizer.decode(generated[anchor:end], skip_special_tokens=True)
        self.anchor, self.window_text = anchor, text
        return delta


class SpeculativeGenerator:
    """Lossless speculative decoding for a transformers causal LM (batch 1; a list of prompts runs one by one).

    target:     a `PreTrainedModel`, or what `specdec.models.resolve_model` accepts: a catalogue name
                (`smollm2-135m-instruct`, pulled on first use), a `.gguf` file, `zoo:<preset>`, an HF folder or id
    drafter:    a registered drafter name or spec (`"ngram:max_n=4"`) or a `Drafter` object
    controller: a registered controller name or spec (`"static:max_depth=6"`) or a `Controller` object
    backend:    how the target runs: "hf" (default), "static", "graph" (static cache + CUDA graphs: the fast path
                on a GPU), "native" (graph with specdec's own Llama-family forward, the fastest) or a backend object
    """

    def __init__(self, target, tokenizer=None, drafter: str | Drafter = "ngram",
                 controller: str | Controller = "heuristic", backend=None, dtype: torch.dtype | str = "auto",
                 device: str | None = None):
        self.dtype_note = None  # what a loaded target's dtype is and why ("bfloat16 (auto: this CPU has ...)")
        if isinstance(target, (str, os.PathLike)):
            target, tokenizer, self.dtype_note = load_model(target, dtype, device, tokenizer)
        self.tokenizer = tokenizer
        if isinstance(backend, str):
            from specdec.backends import BACKENDS

            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
            backend = BACKENDS[backend](target)
        self.backend = backend or HFBackend(target)
        self.phase_sync = False  # PhaseTimer(cuda_sync): benchmarks set it to charge GPU work to its phase
        self.batch_stats = None  # the last batched generate's `specdec.batch.BatchStats` (steps, phase seconds)
        self.batch_policies: dict = {}  # (batch size, allocate) -> its batch gate and allocator (`kept_policy`)
        self.drafter = make_drafter(drafter)
        self.controller = make_controller(controller)
        # batched decoding makes a drafter and a controller per row from these (None: objects were given)
        self._drafter_spec = drafter if isinstance(drafter, str) else None
        self._controller_spec = controller if isinstance(controller, str) else None
        vocab = getattr(self.drafter, "vocab_size", None)
        if vocab is not None and vocab != self.backend.vocab_size:
            raise ValueError(f"drafter vocab {vocab} != target vocab {self.backend.vocab_size}; "
                             f"pass a drafter built for this tokenizer")
        self.target_view = TargetView(self.backend.vocab_size, self.backend.device, self.backend.model)

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = 0, stop: Sequence[str] = (), chat: bool = False,
                 batch_size: int = 1, batch_allocate: bool = True):
        """One prompt (str, list of token ids, 1-D tensor) -> a `GenerationOutput`; a list of strings or a 2-D
        tensor -> a list of them, generated one after another, or with `batch_size` B > 1 up to B at once (a list
        of prompts of one kind: strings, token-id lists or 1-D tensors; `specdec.batch`). batch_allocate: a batch
        cuts its rows' trees to the width worth its measured cost (`specdec.batch.BatchAllocator`); False verifies
        every row's whole proposal."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=seed, stop=stop, chat=chat)
        _check_batch_size(batch_size)
        if batch_size > 1:
            from specdec.batch import decode_batch

            return decode_batch(self, _prompt_list(prompt), batch_size, options, allocate=batch_allocate)
        if _is_batch(prompt):
            return [self.generate(one, **options) for one in _prompt_list(prompt)]
        # the steps' streamed text would go unread: decoding the whole text each step costs O(length) host time
        steps = self._decode_loop(*self._prepare(prompt, **options), stream_text=False)
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                return finished.value

    def stream(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = 0, stop: Sequence[str] = (), chat: bool = False,
               batch_size: int = 1, batch_allocate: bool = True) -> Generator[StreamChunk, None, GenerationOutput]:
        """Yields a `StreamChunk` per step; the generator's return value is the `GenerationOutput`. With `batch_size`
        B > 1 and a list of prompts: up to B at once, a chunk per row per step (`chunk.index` names the prompt),
        and the return value is the list of outputs, in order."""
        _check_batch_size(batch_size)
        if batch_size > 1:
            from specdec.batch import batch_steps

            options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=seed, stop=stop, chat=chat)
            return batch_steps(self, _prompt_list(prompt), batch_size, options, allocate=batch_allocate,
                               stream_text=True)
        return self._decode_loop(*self._prepare(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, chat))

    def _prepare(self, prompt, max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                 stop: Sequence[str], chat: bool) -> tuple[list[int], SamplingParams, StopRule]:
        """One generation's checked prompt ids, sampling parameters and stopping rule."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        prompt_ids = self.encode(prompt, chat)
        room = None if self.backend.max_positions is None else self.backend.max_positions - len(prompt_ids)
        rule = StopRule(max_new_tokens, self._eos_ids(), tuple(stop), self.tokenizer, room)
        return prompt_ids, params, rule

    def _decode_loop(self, prompt_ids: list[int], params: SamplingParams, rule: StopRule,
                     stream_text: bool = True) -> Iterator[StreamChunk]:
        """The steps of one generation; stream_text=False leaves the chunks' text empty (generate() reads none)."""
        stats, timer = GenerationStats(), PhaseTimer(self.phase_sync)
        text = _TextStream(self.tokenizer if stream_text else None)
        started = time.perf_counter()
        generator = make_generator(params, self.backend.device)
        hooks = {name: getattr(self.controller, name, None) for name in ("prepare", "keep_drafting", "trim", "report")}
        if hooks["prepare"] is not None:
            with timer("prepare"):
                hooks["prepare"](self.backend, prompt_ids)
        with timer("prefill"):
            state = self.backend.prefill(prompt_ids[:-1])
        self._drafter_call("reset", stats)  # a request boundary: an online drafter may publish new weights here
        stats.drafter_version = getattr(self.drafter, "version", None)
        offer = getattr(self.backend, "prefix_kv", None)  # the target's cached layers, for drafters that share them
        prefix_kv = None if offer is None else functools.partial(offer, state)
        committed, generated, history = list(prompt_ids), [], []
        end = rule.cut(generated, 0)
        step_started = time.perf_counter()  # then: when the last step's stats were taken
        while end is None:
            budget = self._clamp(self.controller.budget(history), len(committed), rule.limit - len(generated))
            spent_before = dict(timer.seconds)
            tree, proposed = _EMPTY_TREE, 0
            if budget.max_nodes:
                with timer("draft"):
                    tree = self._propose(DraftContext(committed, budget, params, self.target_view, prefix_kv,
                                                      hooks["keep_drafting"]), budget, stats)
                    proposed = len(tree)
                    if hooks["trim"] is not None:  # the subtree worth verifying, or a plain run instead
                        tree = hooks["trim"](tree, timer.seconds["draft"] - spent_before.get("draft", 0.0))
                    if isinstance(tree, Budget):
                        budget = self._clamp(tree, len(committed), rule.limit - len(generated))
                        tree = _EMPTY_TREE
            if budget.max_nodes == 0:  # a plain run: the drafter was not called, or its tree not worth verifying
                new_tokens, result = self._plain_run(state, committed[-1], budget.plain_steps, params, generator,
                                                     timer), None
            else:
                result = verify(self.backend, state, committed[-1], tree, params, generator, timer)
                new_tokens = result.committed_tokens
            start = len(generated)
            generated += new_tokens
            end = rule.cut(generated, start)
            committed = committed + new_tokens  # a new list (a drafter may keep the last one); unused once cut
            with timer("observe"):
                if result is not None:
                    self._drafter_call("observe", stats, result)
                spent = {phase: timer.seconds[phase] - spent_before.get(phase, 0.0) for phase in timer.seconds}
                plain = len(new_tokens) if result is None else 0
                now = time.perf_counter()  # the step ran since the last one's stats: the loop's every cost counted
                step = StepStats(len(tree), max_depth(tree), result.accepted_len if result else 0,
                                 draft_s=spent.get("draft", 0.0),
                                 verify_s=sum(spent.get(phase, 0.0) for phase in ("verify", "accept", "commit")),
                                 step_s=now - step_started, tree=tree,
                                 accepted_nodes=tuple(result.accepted_nodes) if result else (), plain_steps=plain,
                                 proposed_nodes=proposed)
                history.append(step)
                self.controller.observe(step)
                step_started = now
            stats.target_forwards += plain or 1
            stats.drafted_nodes += len(tree)
            stats.accepted_hist[0 if result is None else result.accepted_len] += plain or 1
            yield StreamChunk(generated[start:end], text.push(generated, end))
        generated = generated[:end]
        tail = text.push(generated, final=True)
        if tail:
            yield StreamChunk([], tail)
        stats.new_tokens, stats.stop_reason = len(generated), rule.reason
        stats.seconds, stats.wall_s = dict(timer.seconds), time.perf_counter() - started
        if hooks["report"] is not None:
            stats.controller = hooks["report"]()
        return GenerationOutput(list(prompt_ids), generated, self._decode(generated), stats)

    def _plain_run(self, state, root: int, count: int, params: SamplingParams, generator,
                   timer: PhaseTimer) -> list[int]:
        """`count` plain autoregressive steps from `root` (a controller's budget 0): greedy on a backend that chains
        them, one device run and one host read (the reference decoder's `greedy_decode`); else one at a time."""
        if params.greedy and hasattr(self.backend, "greedy_decode"):
            with timer("verify"):
                return self.backend.greedy_decode(state, root, count)
        tokens = []
        for _ in range(count):
            root = verify(self.backend, state, root, _EMPTY_TREE, params, generator, timer).bonus_token
            tokens.append(root)
        return tokens

    def _clamp(self, budget: Budget, committed_len: int, tokens_left: int) -> Budget:
        """No node past the context window, and no deeper than the tokens still wanted (the bonus comes free)."""
        depth = min(budget.max_depth, max(tokens_left - 1, 0))
        plain = min(budget.plain_steps, max(tokens_left, 1))
        if self.backend.max_positions is not None:
            room = self.backend.max_positions - committed_len
            depth, plain = min(depth, room), max(min(plain, room), 1)
        plain = 1 << (plain.bit_length() - 1)  # a power of two, as the controllers ask: no new chain graph mid-run
        return Budget(max_nodes=budget.max_nodes if depth else 0, max_depth=depth,
                      min_confidence=budget.min_confidence, plain_steps=plain if budget.max_nodes == 0 else 1)

    def _propose(self, ctx: DraftContext, budget: Budget, stats: GenerationStats) -> DraftTree:
        """The drafter's tree, checked; a drafter that raises or returns a bad tree costs one plain step. The tree
        stays where the drafter built it: backends read a host tree's tokens in their own input copy, and only
        sampled acceptance needs it on the device (`verify` moves it; two copies a step saved on a GPU)."""
        if budget.max_nodes == 0 or budget.max_depth == 0:
            return _EMPTY_TREE
        tree = self._drafter_call("propose", stats, ctx)
        if tree is None:
            return _EMPTY_TREE
        problem = self._tree_problem(tree, budget)
        if problem:
            self._drafter_failed(stats, ValueError(problem))
            return _EMPTY_TREE
        return tree

    def _tree_problem(self, tree, budget: Budget) -> str | None:
        """Why a drafter's tree cannot be verified, or None. A draft q that gives its own token probability 0 (or
        is not a distribution) would bias sampling, so it is refused too."""
        if not isinstance(tree, DraftTree):
            return f"propose() returned {type(tree).__name__}, expected a DraftTree"
        if len(tree) == 0:
            return None
        vocab = self.backend.vocab_size
        tokens = tree.host_tokens if tree.host_tokens is not None else tree.tokens.tolist()  # one read, if any
        if min(tokens) < 0 or max(tokens) >= vocab:
            return f"draft token ids must lie in [0, {vocab})"
        if len(tree) > budget.max_nodes or max_depth(tree) > budget.max_depth:
            return (f"the tree ({len(tree)} nodes, depth {max_depth(tree)}) exceeds the budget "
                    f"({budget.max_nodes} nodes, depth {budget.max_depth})")
        q = tree.draft_probs
        if q is not None:
            if q.shape[1] != vocab:
                return f"draft_probs cover {q.shape[1]} tokens, the target's vocab is {vocab}"
            own = q.gather(1, tree.tokens.to(q.device)[:, None])
            if not (torch.isfinite(q).all() and (q >= 0).all() and (own > 0).all()):
                return "draft_probs must be finite, non-negative, and positive at each node's own token"
        return None

    def _drafter_call(self, method: str, stats: GenerationStats, *args):
        try:
            return getattr(self.drafter, method)(*args)
        except Exception as error:  # noqa: BLE001 - any drafter failure falls back to plain decoding
            self._drafter_failed(stats, error)
            return None

    def _drafter_failed(self, stats: GenerationStats, error: Exception) -> None:
        if stats.drafter_errors == 0:
            warnings.warn(f"drafter {type(self.drafter).__name__} failed ({type(error).__name__}: {error}); "
                          f"falling back to plain decoding for that step", RuntimeWarning, stacklevel=3)
        stats.drafter_errors += 1

    def encode(self, prompt, chat: bool = False) -> list[int]:
        """A prompt (str, token ids) -> checked token ids; `chat` applies the tokenizer's chat template."""
        if isinstance(prompt, str):
            ids = self._tokenize(prompt, chat)
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point:
                raise TypeError(f"token ids must be a 1-D integer tensor, got {prompt.dim()}-D {prompt.dtype}")
            ids = prompt.tolist()
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise TypeError(f"prompt must be a str, a list of token ids or a 1-D tensor, got {type(prompt).__name__}")
        return self._check_ids(ids)

    def _tokenize(self, prompt: str, chat: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass tokenizer=... or give token ids")
        if not prompt:
            raise ValueError("the prompt is empty: give some text or token ids")
        if not chat:
            return list(self.tokenizer(prompt).input_ids)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat=True but this tokenizer has no chat template")
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.backend.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the target's vocabulary [0, {vocab})")
        limit = self.backend.max_positions
        if limit is not None and len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context window is {limit}; "
                             f"shorten the prompt to at most {limit - 1} tokens")
        return ids

    def _eos_ids(self) -> frozenset[int]:
        model = self.backend.model
        config = getattr(model, "generation_config", None) or model.config
        eos = getattr(config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else eos or [])

    def _decode(self, token_ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _prompt_list(prompts) -> list:
    """A batch's prompts as a list, all of one kind (str, token-id list, 1-D tensor): else a ValueError naming the
    first prompt of another kind."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        return list(prompts.unbind(0))
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("batch_size > 1 needs a non-empty list of prompts")

    def kind(prompt) -> str:
        return ("a string" if isinstance(prompt, str) else "a tensor" if isinstance(prompt, torch.Tensor)
                else "a list of token ids" if isinstance(prompt, (list, tuple)) else type(prompt).__name__)

    first = kind(prompts[0])
    for number, prompt in enumerate(prompts):
        if kind(prompt) != first:
            raise ValueError(f"prompt {number} is {kind(prompt)} but prompt 0 is {first}: give prompts of one kind")
    return list(prompts)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _is_batch(prompt) -> bool:
    """A 2-D tensor, or a list of prompts (strings, token-id lists, tensors) rather than one list of token ids."""
    if isinstance(prompt, torch.Tensor):
        return prompt.dim() == 2
    return (isinstance(prompt, (list, tuple)) and bool(prompt)
            and all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt))
