"""Controllers decide how large the next draft may be. They are pure policy objects: `budget(history)` reads the
step statistics of the current generation, `observe(step)` may learn across generations.

Optional methods the generator calls where a controller has them (the protocol stays two methods):
    prepare(backend, prompt_ids)   before a generation's prefill: a cost-aware controller profiles the target here
    keep_drafting(frontier) -> bool  between a drafter's depths (`Frontier`): False stops the draft there
    trim(tree, draft_s) -> DraftTree | Budget  after drafting (also an empty proposal): the subtree worth
                                   verifying (closed under parents; an empty tree = one plain step), or a
                                   Budget(0, 0, plain_steps=k): the tree is not verified, k plain steps run instead
    report() -> dict               numbers for the generation's stats (cost-model error, controller seconds, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Budget:
    """What the drafter may propose this step.

    max_nodes:      at most this many tree nodes (0 = skip drafting: a plain autoregressive step)
    max_depth:      at most this many tokens on any root-to-leaf path
    min_confidence: stop expanding a branch whose draft probability falls below this (None = no threshold)

    plain_steps:    with max_nodes 0: this many plain autoregressive steps (greedy on a backend that chains them:
                    one host round trip for all; else they run one at a time)
    """

    max_nodes: int
    max_depth: int
    min_confidence: float | None = None
    plain_steps: int = 1

    def __post_init__(self) -> None:
        if self.max_nodes < 0 or self.max_depth < 0:
            raise ValueError(f"budget sizes must be >= 0, got max_nodes={self.max_nodes}, max_depth={self.max_depth}")
        if self.plain_steps < 1:
            raise ValueError(f"plain_steps must be >= 1, got {self.plain_steps}")


@dataclass(frozen=True)
class StepStats:
    """One draft -> verify step (or one run of plain steps), as a controller sees it.

    drafted_nodes: nodes in the verified tree;  draft_depth: its deepest path;  accepted_len: draft tokens accepted
    draft_s / verify_s: wall seconds of the two phases (verify: verify + accept + commit; a plain run: all of it)
    step_s:        wall seconds of the whole step: since the last step's stats were taken (the loop's every cost:
                   the budget, draft, verify, observe, stopping, streaming); 0 = not measured
    tree / accepted_nodes: the verified tree and its accepted path (node indices), for per-node statistics
    plain_steps:   target forwards of a plain run (budget 0); 0 for a speculative step
    proposed_nodes: nodes the drafter proposed before a controller's `trim`"""

    drafted_nodes: int
    draft_depth: int
    accepted_len: int
    draft_s: float = 0.0
    verify_s: float = 0.0
    step_s: float = 0.0
    tree: Any = None
    accepted_nodes: tuple[int, ...] = ()
    plain_steps: int = 0
    proposed_nodes: int = 0


@dataclass(frozen=True)
class Frontier:
    """What a drafter tells `keep_drafting` between depths: the nodes it would expand next.

    depth:  their depth (1 = the root's children)
    scores: each node's chance of lying on the accepted path as the drafter estimates it (its path score:
            calibrated acceptance rates or draft probabilities, multiplied along the path)
    probs:  each node's own slot probability (the draft's probability of its token at its parent)
    nodes:  nodes in the draft so far
    hidden: (F, H) the draft model's last hidden state at each node's parent (where its token was drafted from),
            for learnt acceptance predictors; None where the drafter has none"""

    depth: int
    scores: tuple[float, ...]
    probs: tuple[float, ...] = ()
    nodes: int = 0
    hidden: Any = None


@runtime_checkable
class Controller(Protocol):
    def budget(self, history: Sequence[StepStats]) -> Budget: ...

    def observe(self, step: StepStats) -> None: ...


_CONTROLLERS: dict[str, Callable[..., Controller]] = {}


def register_controller(name: str):
    """Class decorator: make a controller constructible by name (`make_controller(name, **options)`)."""

    def add(cls):
        _CONTROLLERS[name] = cls
        cls.name = name
        return cls

    return add


def registered_controllers() -> dict[str, Callable[..., Controller]]:
    """Name -> factory, including third-party controllers of the entry-point group `specdec.controllers`."""
    for entry in entry_points(group="specdec.controllers"):
        _CONTROLLERS.setdefault(entry.name, entry.load())
    return dict(_CONTROLLERS)


def make_controller(spec: str | Controller, **options) -> Controller:
    """A controller from a name (`"static"`) or a spec with options (`"static:max_depth=4"`), or the object itself."""
    if not isinstance(spec, str):
        return spec
    from specdec.drafters.base import parse_spec

    name, spec_options = parse_spec(spec)
    # a registered name needs no scan of the installed packages (~20 ms: a batch makes a controller per row)
    known = _CONTROLLERS if name in _CONTROLLERS else registered_controllers()
    if name not in known:
        raise ValueError(f"unknown controller {name!r}; registered controllers: {', '.join(sorted(known))}")
    return known[name](**{**spec_options, **options})
