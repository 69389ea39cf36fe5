"""Benchmark methods: `ar` (specdec's reference decoder, the baseline), any registered drafter spec (`ngram`,
`ngram:max_n=4`, ...), and peers run on the same model in the same process: `hf` (HF `generate`), `hf-static` (HF
`generate` with its static cache, which HF compiles on a GPU: its fastest batch-1 path), `hf-lookup` (HF prompt
lookup), `hf-assisted` (HF assisted generation with `--assistant`).

Every method turns prompt token ids into a `TurnRun`. Methods register by name with `@register_method`; a name that
is not a method is tried as a drafter spec."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from specdec.controllers import registered_controllers
from specdec.drafters import registered_drafters
from specdec.drafters.base import parse_spec
from specdec.evals.peers import hf_generate
from specdec.generator import SpeculativeGenerator
from specdec.reference import AR_CHAIN, reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule


@dataclass(frozen=True)
class TurnRun:
    """One generated answer. forwards: target forwards that produced tokens; phase_seconds: where the time went
    (draft, verify, accept, commit, observe, prefill; empty for peers, which cannot be split); controller: what a
    cost-aware controller reported of the plain (unsynchronised) run."""

    token_ids: list[int]
    seconds: float
    forwards: int
    accepted_hist: dict[int, int] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    controller: dict[str, float] = field(default_factory=dict)  # the controller's report (cost-model error, ...)


@dataclass(frozen=True)
class BenchContext:
    """What every method is built from: the shared target, its tokenizer, and the run's settings."""

    model: object
    tokenizer: object
    params: SamplingParams
    controller: str = "heuristic"
    assistant: object = None
    backend: str = "hf"  # a key of specdec.backends.BACKENDS: how ar and the drafter methods run the target

    def make_backend(self):
        from specdec.backends import BACKENDS

        return BACKENDS[self.backend](self.model)


class Method(Protocol):
    name: str

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnRun: ...


_METHODS: dict[str, Callable[[str, BenchContext], Method]] = {}


def register_method(name: str):
    def add(factory):
        _METHODS[name] = factory
        return factory

    return add


def split_controller(spec: str) -> tuple[str, str | None]:
    """'model:path=D,mode=tree@static:max_depth=7,max_nodes=15' -> ('model:path=D,mode=tree',
    'static:max_depth=7,max_nodes=15'): a drafter method may name a controller of its own after its last '@' (one
    that names no registered controller stays part of the spec: a path may hold '@'); (spec, None) without one."""
    head, sep, tail = spec.rpartition("@")
    if sep and head and parse_spec(tail)[0] in registered_controllers():
        return head, tail
    return spec, None


def make_method(spec: str, context: BenchContext) -> Method:
    """A method by name, or a drafter spec (`ngram:max_n=4`, with a controller of its own: `ngram@static:max_depth=4`)
    run through `SpeculativeGenerator`."""
    name = parse_spec(split_controller(spec)[0])[0]
    if name in _METHODS:
        return _METHODS[name](spec, context)
    if name in registered_drafters():
        return SpecMethod(spec, context)
    known = sorted(set(_METHODS) | set(registered_drafters()))
    raise ValueError(f"unknown method {spec!r}; known methods: {', '.join(known)}")


def _timed(fn):
    """Run fn() with the GPU synchronised on both sides; returns (result, seconds)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def _eos_ids(model) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return frozenset([eos] if isinstance(eos, int) else eos or [])


@register_method("ar")
class ArMethod:
    """specdec's reference decoder on the run's backend: one forward per token (greedy on the graph / native
    backends: AR_CHAIN tokens per host round trip, `reference_decode`). The baseline of every speedup.
    `ar:chain=1`: one host round trip per token there too (the baseline of reports before chained decoding)."""

    def __init__(self, spec: str, context: BenchContext):
        self.name, self.context = spec, context
        options = parse_spec(spec)[1]
        self.chain = options.pop("chain", AR_CHAIN)
        if options or isinstance(self.chain, bool) or not isinstance(self.chain, int) or self.chain < 1:
            raise ValueError(f"{spec!r}: `ar` takes one option, chain=N (tokens per host round trip, N >= 1)")
        self.backend = context.make_backend()

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnRun:
        rule = StopRule(max_new_tokens, _eos_ids(self.context.model),
                        room=self.backend.max_positions and self.backend.max_positions - len(prompt_ids))
        tokens, seconds = _timed(lambda: reference_decode(self.backend, prompt_ids, self.context.params, rule,
                                                          self.chain))
        return TurnRun(tokens, seconds, forwards=len(tokens), accepted_hist={0: len(tokens)},
                       phase_seconds={"verify": seconds})


class SpecMethod:
    """A drafter spec through `SpeculativeGenerator`, with the run's controller or its own (`SPEC@CONTROLLER`).

    Timed the way `ar` is, without instrumentation: the tokens, seconds and forwards come from a plain run. Where
    the target runs on a GPU the phase split (t_verify, t_draft, S_step) needs a synchronisation at every phase
    boundary, which costs time of its own (~0.1 ms a step on the H100), so it comes from a second, synchronised run
    of the same turn, scaled to the first run's forwards (a drafter that learns may take a different number)."""

    def __init__(self, spec: str, context: BenchContext):
        self.name, self.context = spec, context
        drafter, controller = split_controller(spec)
        self.generator = SpeculativeGenerator(context.model, tokenizer=context.tokenizer, drafter=drafter,
                                              controller=controller or context.controller,
                                              backend=context.make_backend())
        self.synced_phases = self.generator.backend.device.type == "cuda"

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnRun:
        params = self.context.params

        def generate(phase_sync: bool):
            self.generator.phase_sync = phase_sync
            return self.generator.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=params.temperature,
                                           top_p=params.top_p, top_k=params.top_k, seed=params.seed)

        out, seconds = _timed(lambda: generate(False))
        stats, phases = out.stats, dict(out.stats.seconds)
        if self.synced_phases:  # under a copy of the controller: what a learning controller measures in the synced
            kept = self.generator.controller  # run (each phase's sync: ~0.5 ms more a speculative step on an H200,
            self.generator.controller = detached(kept, self.generator.backend)  # less a plain run) is not real
            try:
                synced = generate(True).stats
            finally:
                self.generator.controller = kept
            scale = stats.target_forwards / max(synced.target_forwards, 1)
            phases = {phase: value * scale for phase, value in synced.seconds.items()}
        return TurnRun(out.token_ids, seconds, stats.target_forwards, dict(stats.accepted_hist), phases,
                       {key: value for key, value in stats.controller.items() if isinstance(value, (int, float))})


def detached(controller, backend):
    """A copy of `controller` sharing nothing mutable with it but the backend it may hold (not copied)."""
    return copy.deepcopy(controller, {id(backend): backend})


class _HFPeer:
    """HF `generate` (greedy only): plain, prompt lookup, or assisted."""

    options: dict = {}

    def __init__(self, spec: str, context: BenchContext):
        if not context.params.greedy:
            raise ValueError(f"{spec} is measured greedy only; run it with --temperature 0")
        self.name, self.context = spec, context
        self.extra = {**self.options, **parse_spec(spec)[1]}

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> TurnRun:
        peer = hf_generate(self.context.model, prompt_ids, max_new_tokens, **self.extra)
        return TurnRun(peer.token_ids, peer.seconds, peer.forwards)


@register_method("hf")
class HFGenerate(_HFPeer):
    pass


@register_method("hf-lookup")
class HFLookup(_HFPeer):
    options = {"prompt_lookup_num_tokens": 10}


@register_method("hf-static")
class HFStatic(_HFPeer):
    """HF `generate` on its fastest batch-1 path: a static cache, whose decode step HF compiles on a GPU."""

    options = {"cache_implementation": "static"}


@register_method("hf-assisted")
class HFAssisted(_HFPeer):
    def __init__(self, spec: str, context: BenchContext):
        if context.assistant is None:
            raise ValueError("hf-assisted needs a draft model: pass --assistant PATH")
        super().__init__(spec, context)
        self.extra["assistant_model"] = context.assistant
