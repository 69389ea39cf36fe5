"""Peer methods measured beside specdec on the same model: HF `generate` greedy (DynamicCache, or its static cache),
HF prompt lookup, HF assisted generation. Each returns the new tokens, the number of target forwards (to compute tau the way specdec does) and the
wall time."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.backends.cpu_linear import LinearKernel


@dataclass(frozen=True)
class PeerRun:
    """forwards: target forward calls that produced tokens (HF's prefill forward produces the first token, so it
    counts; specdec's prefill produces none and does not)."""

    token_ids: list[int]
    forwards: int
    seconds: float

    @property
    def tau(self) -> float:
        return len(self.token_ids) / self.forwards if self.forwards else 0.0


class _ForwardCounter:
    """Counts calls of `model.forward` while active."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        original = self.model.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        self.model.forward = counted
        return self

    def __exit__(self, *exc):
        del self.model.forward  # drops the instance attribute, the class's forward shows again


def hf_generate(model, prompt_ids: Sequence[int], max_new_tokens: int, prompt_lookup_num_tokens: int | None = None,
                assistant_model=None, eos_token_id=None, cache_implementation: str | None = None,
                linear: str = "auto") -> PeerRun:
    """Greedy HF `generate`; with `prompt_lookup_num_tokens` it is HF prompt lookup, with `assistant_model` HF
    assisted generation. linear: the CPU linear kernel of both models (`specdec.backends.cpu_linear`; "auto" makes
    the choice specdec's backend makes, so a comparison measures the method, not the kernel)."""
    input_ids = torch.tensor([list(prompt_ids)], device=model.device)
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(input_ids),
                   prompt_lookup_num_tokens=prompt_lookup_num_tokens, assistant_model=assistant_model)
    if cache_implementation is not None:
        options["cache_implementation"] = cache_implementation
    if eos_token_id is not None:
        options["eos_token_id"] = eos_token_id
    kernels = [LinearKernel(one, linear) for one in (model, assistant_model) if one is not None]
    with _ForwardCounter(model) as counter, torch.inference_mode(), contextlib.ExitStack() as stack:
        for kernel in kernels:
            stack.enter_context(kernel.active())
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = model.generate(input_ids, **options)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return PeerRun(output[0, input_ids.shape[1]:].tolist(), counter.calls, seconds)
