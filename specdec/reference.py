"""The plain autoregressive decoder: one target forward per token, the same logits processing, stopping rules and
backend as the speculative generator. It is the oracle of every test and the AR baseline of every benchmark.

Greedy decoding on a backend with `greedy_decode` (the graph and native backends) runs `chain` tokens per host
round trip: each step's argmax feeds the next on the device (one CUDA graph replay for the chain), the same logits
and picks as one `decode` at a time; the stop rules then cut the chain where the generation ends (at most
chain - 1 steps past an EOS are wasted). A step of a 1.1B model on the H100 is ~1.1 ms of GPU time and ~0.15 ms of
host work between steps: the baseline every speedup is measured against should not pay that per token. Where the
backend has `greedy_stream` the chains are also pipelined: the next one is launched before the host reads the last
(at most one more chain wasted at the end)."""

from __future__ import annotations

from typing import Sequence

import torch

from specdec.backends.base import Backend
from specdec.sampling import SamplingParams, make_generator, target_probs
from specdec.stopping import StopRule

AR_CHAIN = 8  # greedy tokens per host round trip on backends with `greedy_decode`


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy: argmax of the raw logits (first maximum). Otherwise a draw from `target_probs`."""
    if params.greedy:
        return int(logits.argmax(-1))
    return int(torch.multinomial(target_probs(logits, params), 1, generator=generator))


def reference_decode(backend: Backend, prompt_ids: Sequence[int], params: SamplingParams,
                     stop: StopRule, chain: int = AR_CHAIN) -> list[int]:
    """Generate from `prompt_ids` one token at a time (greedy: up to `chain` per host round trip where the backend
    has `greedy_decode`; chain=1: always one); returns the new tokens."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    generator = make_generator(params, backend.device)
    state = backend.prefill(prompt_ids[:-1])
    generated: list[int] = []
    root = prompt_ids[-1]
    chained = params.greedy and chain > 1 and hasattr(backend, "greedy_decode")
    end = stop.cut(generated, 0)
    if chained and end is None and hasattr(backend, "greedy_stream"):  # the chains pipelined (module docstring)
        for new in backend.greedy_stream(state, root, chain, stop.limit):
            generated += new
            root = new[-1]
            end = stop.cut(generated, len(generated) - len(new))
            if end is not None:
                break
    while end is None:  # (after a stream: the cache's last slots)
        count = min(chain, stop.limit - len(generated), backend.max_len - state.length) if chained else 1
        if count > 1:
            new = backend.greedy_decode(state, root, count)
        else:
            new = [next_token(backend.decode(state, root), params, generator)]
        generated += new
        root = new[-1]
        end = stop.cut(generated, len(generated) - len(new))
    return generated[:end]
