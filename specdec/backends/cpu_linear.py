"""Which kernel runs a CPU model's float32 `nn.Linear` layers: aten's (MKL's sgemm) or oneDNN's matmul.

On the 2-core AMD EPYC (AVX2) this project's CPU runs use, MKL's sgemm is slow for a wide weight and a few rows:
SmolLM2-135M's LM head (49152 x 576) takes 8.7 / 18.4 / 19.8 ms for 1 / 2 / 4 rows under aten and 4.7 / 8.5 /
11.1 ms under oneDNN; Qwen2.5-1.5B's (151936 x 1536) 56 / 127 / 188 ms against 39 / 66 / 63 ms. The rows of a
verify are its tree's nodes, so aten makes a verify dear: SmolLM2's whole step (300-token context, the two
kernels alternating) costs 65 ms plain under both, and 112 / 117 / 148 ms for a tree of 1 / 4 / 16 nodes under
aten against 78 / 88 / 115 ms under oneDNN. Another CPU may rank them otherwise, so `auto` times both on the
model's own layers, once per machine and shapes (`cached_choice`), and takes oneDNN only where it is clearly
faster.

The swap is scoped: `LinearKernel.active()` routes the model's linear layers through oneDNN for one forward and
restores them after; the model's code and weights are not touched. The target's plain and speculative steps run
through the same backend, so both use the same kernel (lossless: greedy output equals `ar`'s of the same backend).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

KERNELS = ("auto", "aten", "onednn")
AUTO_MIN_PARAMS = 20_000_000  # below this, forwards are dominated by the host: `auto` keeps aten (no timing)
AUTO_ROWS = (1, 4, 16)        # a plain step's one row, and verifies of a few and of many nodes
AUTO_MARGIN = 0.9             # oneDNN must take at most this share of aten's time to be chosen
ONEDNN_MAX_ROWS = 128        # a forward of more rows (a prefill) stays on aten, faster there
AUTO_TIMED_PARAMS = 50_000_000  # the layers timed: the first ones up to this many weights, and the last (LM head)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """oneDNN for a step's few rows; aten's for a prompt's many (SmolLM2's layers at 1,500 rows: oneDNN 1.16x
    aten's time; at 256 rows 0.95x, at 16 rows 0.76x)."""
    if x.numel() > ONEDNN_MAX_ROWS * x.shape[-1]:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, "none", [], "")


class LinearKernel:
    """The linear kernel of one model: `name` is "aten" or "onednn"; `active()` applies it around a forward."""

    def __init__(self, model: nn.Module, kernel: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"unknown linear kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.model = model
        # exact nn.Linear (no subclass or quantized wrapper), and none whose forward is already an instance's own
        # (accelerate's hooks put theirs there): `active` would drop it
        self.linears = [module for module in model.modules()
                        if type(module) is nn.Linear and "forward" not in module.__dict__]
        parameter = next(model.parameters(), None)
        fits = (parameter is not None and parameter.device.type == "cpu" and parameter.dtype == torch.float32
                and onednn_available())
        if kernel == "onednn" and not fits:
            raise ValueError("the onednn linear kernel runs float32 models on a CPU with oneDNN (torch.backends.mkldnn)")
        if kernel == "auto":
            kernel = "aten"
            if fits and sum(module.weight.numel() for module in self.linears) >= AUTO_MIN_PARAMS:
                kernel = cached_choice(self.linears)
        self.name = kernel
        self._forwards = [functools.partial(_onednn_forward, module) for module in self.linears] if kernel == "onednn" else []

    @contextlib.contextmanager
    def active(self):
        if self.name == "aten":
            yield
            return
        for module, forward in zip(self.linears, self._forwards):  # the instance's own `forward` shadows the
            module.__dict__["forward"] = forward                    # class's; popped after
        try:
            yield
        finally:
            for module in self.linears:
                module.__dict__.pop("forward", None)


def weight_shapes(linears: list[nn.Linear]) -> tuple[tuple[int, int, int], ...]:
    """((out, in, how many layers have it), ...), sorted: what the choice depends on, besides the machine."""
    counts: dict[tuple[int, int], int] = {}
    for module in linears:
        shape = tuple(module.weight.shape)
        counts[shape] = counts.get(shape, 0) + 1
    return tuple(sorted((out, inp, count) for (out, inp), count in counts.items()))


_CHOSEN: dict[str, str] = {}  # this process's choices by key sha


def cached_choice(linears: list[nn.Linear], cache_dir: Path | None = None) -> str:
    """The kernel `time_kernels` picks for these layers on this machine, timed once per (CPU, threads, weight
    shapes) and kept on disk beside the cost profiles (a file that does not parse is timed again)."""
    from specdec.controllers.cost import _cpu_name, default_cache_dir

    key = {"device": f"{_cpu_name()} x{torch.get_num_threads()} threads", "shapes": weight_shapes(linears)}
    sha = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    if sha in _CHOSEN:
        return _CHOSEN[sha]
    path = (cache_dir or default_cache_dir()).parent / "linear" / f"{sha}.json"
    try:
        kernel = json.loads(path.read_text())["kernel"]
        if kernel not in ("aten", "onednn"):
            raise ValueError(kernel)
    except (OSError, ValueError, KeyError, TypeError):
        kernel, totals = time_kernels(timed_layers(linears))
        with contextlib.suppress(OSError):  # a read-only cache only costs the timing next time
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "kernel": kernel, "seconds": totals}, indent=1))
    _CHOSEN[sha] = kernel
    return kernel


def timed_layers(linears: list[nn.Linear]) -> list[nn.Linear]:
    """The layers `auto` times: all of a small model's; of a large one, the first layers up to AUTO_TIMED_PARAMS
    weights and the last one (the LM head, where the kernels differ most), so a 1.5B model takes seconds, not 30."""
    timed, total = [], 0
    for module in linears[:-1]:
        if total >= AUTO_TIMED_PARAMS:
            break
        timed.append(module)
        total += module.weight.numel()
    return timed + linears[-1:]


def time_kernels(linears: list[nn.Linear], reps: int = 2) -> tuple[str, dict[str, float]]:
    """("onednn" if oneDNN takes at most AUTO_MARGIN of aten's time, else "aten"; each kernel's seconds). Each
    kernel runs every layer once per row count of AUTO_ROWS, as a forward would (the model's own weights, streamed
    from memory as in a forward: a single weight timed alone stays in the cache and hides the difference, which is
    largest for wide layers such as the LM head); the two alternate, and each keeps its fastest pass."""
    kernels = {"aten": lambda module, x: torch.nn.functional.linear(x, module.weight, module.bias),
               "onednn": _onednn_forward}
    inputs = {(rows, size): torch.randn(1, rows, size) for rows in AUTO_ROWS for size in {m.in_features for m in linears}}
    best = {(name, rows): float("inf") for name in kernels for rows in AUTO_ROWS}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for rows in AUTO_ROWS:
                for name, run in kernels.items():
                    start = time.perf_counter()
                    for module in linears:
                        run(module, inputs[rows, module.in_features])
                    if rep:  # the first pass warms up
                        best[name, rows] = min(best[name, rows], time.perf_counter() - start)
    totals = {name: sum(best[name, rows] for rows in AUTO_ROWS) for name in kernels}
    return ("onednn" if totals["onednn"] <= AUTO_MARGIN * totals["aten"] else "aten"), totals
