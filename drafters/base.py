"""The drafter plugin point: a protocol of three methods and a registry.

A drafter proposes a `DraftTree` below the last committed token; the verifier tells it what the target said
(`observe`); `reset` starts a new sequence. Drafters register by the `@register_drafter("name")` decorator or by the
entry-point group `specdec.drafters`; the generator never looks at a drafter's name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from specdec.controllers.base import Budget, Frontier
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree

if TYPE_CHECKING:
    from specdec.verify import VerifyResult


@dataclass(frozen=True)
class TargetView:
    """What a drafter may know of the target: its vocabulary size, device, and the model itself (for drafters that
    share its layers)."""

    vocab_size: int
    device: torch.device
    model: Any = None


@dataclass(frozen=True)
class DraftContext:
    """token_ids: the committed sequence (prompt + generated); its last token is the root of the tree to propose.
    prefix_kv: where the backend offers it, `prefix_kv(layers)` -> the target's cached keys and values of its first
    `layers` layers for token_ids[:-1], [(keys, values)] each (1, Hkv, len - 1, D), read-only (drafters that run the
    target's own first layers read them instead of keeping a cache of their own).
    keep_drafting: the controller's mid-draft hook, where it has one: drafters that grow a draft depth by depth
    call it with the next `Frontier` before each further depth and stop when it says False."""

    token_ids: Sequence[int]
    budget: Budget
    params: SamplingParams
    target: TargetView
    prefix_kv: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
    keep_drafting: Callable[[Frontier], bool] | None = None


@runtime_checkable
class Drafter(Protocol):
    """vocab_size: the vocabulary the drafter's token ids live in, or None when it copies ids from the context.

    Optional, for batched decoding: `batch_proposer(batch_size, max_len, target, native)` -> an object with
    `propose(contexts) -> trees` (one per row, None for an idle row or a row that drafts nothing) and
    `release(row)` (a new sequence takes the row), or None. Where a drafter has one, a batch's rows draft through it
    in one call (the `model` drafter: one draft forward per depth for all rows); its rows' own drafters still
    observe their verified trees."""

    vocab_size: int | None

    def propose(self, ctx: DraftContext) -> DraftTree: ...

    def observe(self, result: VerifyResult) -> None: ...

    def reset(self) -> None: ...


_DRAFTERS: dict[str, Callable[..., Drafter]] = {}


MATCH_CAP = 32  # `match_length` looks back at most this far


def match_length(tokens: Sequence[int], end: int, cap: int = MATCH_CAP) -> int:
    """How many tokens before `end` equal the context's last ones: the common suffix of tokens[:end] and tokens (at
    most `cap`). A copying drafter's evidence that the text after `end` continues the context (`DraftTree.match_len`):
    a copy found on 20 matching tokens is likelier to go on than one found on a single token."""
    length, last = 0, len(tokens) - 1
    while length < cap and end - 1 - length >= 0 and tokens[end - 1 - length] == tokens[last - length]:
        length += 1
    return length


def register_drafter(name: str):
    """Class decorator: make a drafter constructible by name (`make_drafter(name, **options)`)."""

    def add(cls):
        _DRAFTERS[name] = cls
        cls.name = name
        return cls

    return add


def registered_drafters() -> dict[str, Callable[..., Drafter]]:
    """Name -> factory, including drafters of installed packages (entry-point group `specdec.drafters`)."""
    for entry in entry_points(group="specdec.drafters"):
        if entry.name not in _DRAFTERS:
            _DRAFTERS[entry.name] = entry.load()
    return dict(_DRAFTERS)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`"ngram:max_n=4,min_n=2"` -> ("ngram", {"max_n": 4, "min_n": 2}); values are Python literals or strings."""
    name, _, tail = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"bad option {item!r} in {spec!r}: write key=value, e.g. 'ngram:max_n=4'")
        try:
            options[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = raw.strip()
    return name.strip(), options


def make_drafter(spec: str | Drafter, **options) -> Drafter:
    """A drafter from a registered name or spec string (`"ngram:max_n=4"`), or the object itself."""
    if not isinstance(spec, str):
        return spec
    name, spec_options = parse_spec(spec)
    # a registered name needs no scan of the installed packages (~20 ms: a batch makes a drafter per row)
    known = _DRAFTERS if name in _DRAFTERS else registered_drafters()
    if name not in known:
        raise ValueError(f"unknown drafter {name!r}; registered drafters: {', '.join(sorted(known))}")
    options = {**spec_options, **options}
    learning = [key for key in options if key == "online" or key.startswith("online_")]
    if learning and options.get("online", True) and not getattr(known[name], "learns_online", False):
        able = sorted(n for n, factory in registered_drafters().items() if getattr(factory, "learns_online", False))
        raise ValueError(f"drafter {name!r} cannot learn online ({', '.join(learning)} given); drafters that can: "
                         f"{', '.join(able)}")
    return known[name](**options)
