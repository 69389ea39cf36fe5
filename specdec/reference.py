"""The plain autoregressive decoder: one target forward per token, the same logits processing, stopping rules and
backend as the speculative generator. It is the oracle of every test and the AR baseline of every benchmark."""

from __future__ import annotations

from typing import Sequence

import torch

from specdec.backends.base import Backend
from specdec.sampling import SamplingParams, make_generator, target_probs
from specdec.stopping import StopRule


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy: argmax of the raw logits (first maximum). Otherwise a draw from `target_probs`."""
    if params.greedy:
        return int(logits.argmax(-1))
    return int(torch.multinomial(target_probs(logits, params), 1, generator=generator))


def reference_decode(backend: Backend, prompt_ids: Sequence[int], params: SamplingParams,
                     stop: StopRule) -> list[int]:
    """Generate from `prompt_ids` one token at a time; returns the new tokens."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    generator = make_generator(params, backend.device)
    state = backend.prefill(prompt_ids[:-1])
    generated: list[int] = []
    root = prompt_ids[-1]
    end = stop.cut(generated, 0)
    while end is None:
        root = next_token(backend.decode(state, root), params, generator)
        generated.append(root)
        end = stop.cut(generated, len(generated) - 1)
    return generated[:end]
