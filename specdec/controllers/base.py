"""Controllers decide how large the next draft may be. They are pure policy objects: `budget(history)` reads the
step statistics of the current generation, `observe(step)` may learn across generations."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Budget:
    """What the drafter may propose this step.

    max_nodes:      at most this many tree nodes (0 = skip drafting: a plain autoregressive step)
    max_depth:      at most this many tokens on any root-to-leaf path
    min_confidence: stop expanding a branch whose draft probability falls below this (None = no threshold)
    """

    max_nodes: int
    max_depth: int
    min_confidence: float | None = None

    def __post_init__(self) -> None:
        if self.max_nodes < 0 or self.max_depth < 0:
            raise ValueError(f"budget sizes must be >= 0, got max_nodes={self.max_nodes}, max_depth={self.max_depth}")


@dataclass(frozen=True)
class StepStats:
    """One draft -> verify step, as a controller sees it.

    drafted_nodes: nodes in the proposed tree;  draft_depth: its deepest path;  accepted_len: draft tokens accepted
    draft_s / verify_s: wall seconds of the two phases."""

    drafted_nodes: int
    draft_depth: int
    accepted_len: int
    draft_s: float = 0.0
    verify_s: float = 0.0


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
    known = registered_controllers()
    if name not in known:
        raise ValueError(f"unknown controller {name!r}; registered controllers: {', '.join(sorted(known))}")
    return known[name](**{**spec_options, **options})
