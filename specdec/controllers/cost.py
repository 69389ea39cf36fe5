"""What a step costs on this machine: t_verify(n), t_draft(depth), the rest of a step, and plain decoding.

    cost = CostModel.load_or_profile(backend, prompt_ids)   # profiled once per (device, model, dtype, backend)
    cost.verify_s(12)            # seconds of one verification of a 12-node tree (root + 12 queries)
    cost.step_s(12, depth=4)     # + the drafter's time for 4 depths + the step's other host work
    cost.plain_s(8)              # seconds of 8 plain autoregressive steps run as one chain
    cost.seed_plain(profile_plain(backend, prompt_ids))      # greedy chains timed (graph backends: captured)
    cost.observe(step)           # refine from a measured `StepStats` (moving averages; no device sync)

**Profile.** `profile_verify` times `verify` (the step's real path: the tree-mask forward, acceptance, compaction)
on chains of n random-ish nodes at the prompt's context length, median of `reps` runs after a warm-up, n from
`PROFILE_NODES` up to the largest budget, within a time limit (the largest sizes are dropped first; at least the
plain step and one tree size are timed). Backends with query buckets (graph, native) cost a step by its bucket, so
`verify_s(n)` is the profiled time of the smallest profiled size >= n there; elsewhere it interpolates linearly.

**Refinement.** Each measured step moves the profiled points it was predicted from toward its time (weight 1 -
decay), a plain run of one step the point of 0 nodes (the same forward); the draft time is a line a + b * depth and
the plain-chain time a line c + d * steps, both fitted by exponentially weighted least squares of the measured
steps. The prediction error of every step (before it is learnt) is kept: `error()` is the mean absolute percentage
error, what `specdec bench` reports.

**Disk cache.** `<cache>/costs/<key>.json`, key = sha256 of (device name, a checksum of the model's config and
a sample of its weights, dtype, backend class): a second run on the same machine skips the profile. A file that
is unreadable or of another key is ignored (and rewritten)."""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy
import torch

PROFILE_NODES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
ONE_X = 0.1  # `OnlineLine`: x's spread below this share of their mean counts as one x


class OnlineLine:
    """y ~ a + b * x by exponentially weighted least squares (decay: the weight of the past per observation).
    Where the x's weighted standard deviation is under ONE_X of their mean (one x so far, or old points at other x's
    faded to nothing) the line goes through the origin and the mean point (cost proportional to x): a slope fitted
    through faded points would keep whatever they said, however old (a draft model's first draft, its prefill
    included, once taught goodput that every depth past 1 costs twice what it does, and it never drafted deeper
    again to learn otherwise)."""

    def __init__(self, decay: float = 0.95):
        self.decay, self.sums = decay, [0.0] * 5  # weight, Σx, Σy, Σxx, Σxy

    def add(self, x: float, y: float) -> None:
        self.sums = [self.decay * s + v for s, v in zip(self.sums, (1.0, x, y, x * x, x * y))]

    @property
    def seen(self) -> bool:
        return self.sums[0] > 0

    def __call__(self, x: float) -> float:
        weight, sx, sy, sxx, sxy = self.sums
        if weight == 0:
            return 0.0
        mean_x, mean_y = sx / weight, sy / weight
        spread = sxx / weight - mean_x * mean_x
        if spread <= max(ONE_X * ONE_X * mean_x * mean_x, 1e-9):
            return mean_y * x / mean_x if mean_x > 0 else mean_y
        slope = (sxy / weight - mean_x * mean_y) / spread
        return max(mean_y + slope * (x - mean_x), 0.0)


class CostModel:
    """verify_points: {nodes: seconds} of one verification; stepwise: cost a size by the next profiled one (query
    buckets) instead of interpolating; decay: weight of the old value in each moving average."""

    def __init__(self, verify_points: dict[int, float], stepwise: bool = False, decay: float = 0.9):
        if not verify_points or 0 not in verify_points:
            raise ValueError("a cost model needs the plain step's time: verify_points[0]")
        if any(seconds <= 0 or not math.isfinite(seconds) for seconds in verify_points.values()):
            raise ValueError(f"verification times must be finite and > 0, got {verify_points}")
        self.sizes = sorted(verify_points)
        self.points = nondecreasing([float(verify_points[n]) for n in self.sizes])
        self.stepwise, self.decay = stepwise, decay
        self.draft = OnlineLine()
        self.plain = OnlineLine()
        self.other = 0.0  # seconds of a step outside draft and verify (observe, the controller, the loop)
        self._errors = [0.0, 0]  # Σ |predicted - measured| / measured, steps

    def verify_s(self, nodes: int) -> float:
        """Seconds of one verification of a tree of `nodes` nodes."""
        sizes, points = self.sizes, self.points
        at = bisect.bisect_left(sizes, nodes)
        if at < len(sizes) and sizes[at] == nodes:
            return points[at]
        if at == len(sizes):  # past the profile: extend its last slope
            if len(sizes) == 1:
                return points[0]
            slope = (points[-1] - points[-2]) / (sizes[-1] - sizes[-2])
            return points[-1] + max(slope, 0.0) * (nodes - sizes[-1])
        if self.stepwise:
            return points[at]
        low, high = sizes[at - 1], sizes[at]
        return points[at - 1] + (points[at] - points[at - 1]) * (nodes - low) / (high - low)

    def verify_table(self, max_nodes: int) -> numpy.ndarray:
        """(max_nodes + 1,) `verify_s(n)` for n = 0..max_nodes, vectorised."""
        nodes = numpy.arange(max_nodes + 1)
        sizes, points = numpy.asarray(self.sizes), numpy.asarray(self.points)
        if self.stepwise:
            table = points[numpy.minimum(numpy.searchsorted(sizes, nodes), len(sizes) - 1)]
        else:
            table = numpy.interp(nodes, sizes, points)
        beyond = nodes > sizes[-1]
        if beyond.any():
            table[beyond] = [self.verify_s(int(n)) for n in nodes[beyond]]
        return table

    def draft_s(self, depth: int) -> float:
        """The drafter's seconds for a draft of `depth` depths (0 before any step was measured)."""
        return self.draft(depth) if depth > 0 else 0.0

    def plain_s(self, steps: int) -> float:
        """Seconds of `steps` plain steps run as one chain: the measured line, at most what `steps` single plain
        steps and one step's other work cost (the line is extrapolated from few runs; a chain is never slower)."""
        single = self.points[0] * steps + self.other
        return min(self.plain(steps), single) if self.plain.seen else single

    def step_s(self, nodes: int, depth: int) -> float:
        """Predicted seconds of a whole speculative step: draft + verify + the rest."""
        return self.draft_s(depth) + self.verify_s(nodes) + self.other

    def observe(self, step, draft: bool = True) -> None:
        """Learn from a measured `StepStats` (its error against the prediction is counted first); draft=False: not
        its draft seconds (a drafter's catch-up on what it missed, not a draft's cost)."""
        if step.plain_steps:
            measured = step.step_s or step.verify_s
            self._count_error(self.plain_s(step.plain_steps), measured)
            self.plain.add(step.plain_steps, measured)
            if step.plain_steps == 1 and step.verify_s:  # one plain step is the forward a tree of 0 nodes runs: its
                self._refine(0, step.verify_s)  # time keeps `plain_s`'s cap (the single steps) from going stale
            return
        if step.step_s:
            self._count_error(self.step_s(step.drafted_nodes, step.draft_depth), step.step_s)
            self.other = self._average(self.other, max(step.step_s - step.draft_s - step.verify_s, 0.0))
        if step.draft_depth and draft:
            self.draft.add(step.draft_depth, step.draft_s)
        self._refine(step.drafted_nodes, step.verify_s)

    def seed_plain(self, points: dict[int, float]) -> None:
        """Start the plain-run line from profiled runs ({steps: seconds}, `profile_plain`)."""
        for steps, seconds in sorted(points.items()):
            self.plain.add(steps, seconds)

    def error(self) -> tuple[float, int]:
        """(mean absolute percentage error of the predicted step times, steps counted)."""
        total, steps = self._errors
        return (total / steps if steps else 0.0), steps

    def _count_error(self, predicted: float, measured: float) -> None:
        if measured > 0:
            self._errors[0] += abs(predicted - measured) / measured
            self._errors[1] += 1

    def _average(self, old: float, new: float) -> float:
        return self.decay * old + (1.0 - self.decay) * new

    def _refine(self, nodes: int, seconds: float) -> None:
        """Move the point(s) `verify_s(nodes)` was read from toward the measured time."""
        if seconds <= 0:
            return
        sizes, points = self.sizes, self.points
        at = bisect.bisect_left(sizes, nodes)
        if at == len(sizes):
            at = len(sizes) - 1
        if self.stepwise or sizes[at] == nodes or at == 0:
            points[at] = self._average(points[at], seconds)
        else:
            low, high = sizes[at - 1], sizes[at]
            share = (nodes - low) / (high - low)  # how much of the interpolation the upper point carries
            miss = (1.0 - self.decay) * (seconds - self.verify_s(nodes))
            points[at - 1] = max(points[at - 1] + miss * (1.0 - share), 1e-9)
            points[at] = max(points[at] + miss * share, 1e-9)
        for i in range(at + 1, len(points)):  # a larger tree never costs less: push the neighbours along
            if points[i] >= points[i - 1]:
                break
            points[i] = points[i - 1]
        for i in range(max(at - 2, 0), -1, -1):
            if points[i] <= points[i + 1]:
                break
            points[i] = points[i + 1]

    # ---- profile and disk cache -------------------------------------------------------------------------------

    @classmethod
    def load_or_profile(cls, backend, prompt_ids: Sequence[int], max_nodes: int = 64, reps: int = 10,
                        seconds: float | None = None, cache_dir: Path | None = None, decay: float = 0.9) -> CostModel:
        """The cached profile of this (device, model, dtype, backend), else a new one (written to the cache)."""
        stepwise = hasattr(backend, "buckets")
        key = cost_key(backend)
        path = (cache_dir or default_cache_dir()) / f"{key['sha']}.json"
        points = _read_profile(path, key, max_nodes)
        if points is None:
            limit = seconds if seconds is not None else (60.0 if backend.device.type == "cuda" else 30.0)
            points = profile_verify(backend, prompt_ids, max_nodes, reps, limit)
            _write_profile(path, key, points, max_nodes)
        return cls(points, stepwise=stepwise, decay=decay)


def nondecreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): a profile timed on a busy
    machine can say 8 nodes cost less than 4; the fit says they cost the same."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean_a, count_a), (mean_b, count_b) = blocks.pop(-2), blocks.pop()
            blocks.append([(mean_a * count_a + mean_b * count_b) / (count_a + count_b), count_a + count_b])
    return [mean for mean, count in blocks for _ in range(int(count))]


def default_cache_dir() -> Path:
    """`$SPECDEC_COST_CACHE`, else `<specdec cache>/costs`."""
    from specdec.models import cache_root

    return Path(os.environ["SPECDEC_COST_CACHE"]) if os.environ.get("SPECDEC_COST_CACHE") else cache_root() / "costs"


def profile_nodes(max_nodes: int, backend) -> list[int]:
    """The tree sizes to time: PROFILE_NODES up to max_nodes; on a bucketed backend each bucket's largest tree."""
    buckets = getattr(backend, "buckets", None)
    sizes = [bucket - 1 for bucket in buckets] if buckets else list(PROFILE_NODES)
    return sorted({0, *(n for n in sizes if 0 <= n <= max_nodes)})


@torch.no_grad()  # not inference_mode: a graph backend's static tensors made here are reused outside it
def profile_verify(backend, prompt_ids: Sequence[int], max_nodes: int = 64, reps: int = 10,
                   seconds: float = 30.0) -> dict[int, float]:
    """{nodes: median seconds of `verify`} on a throw-away sequence of the prompt (see the module docstring)."""
    from specdec.sampling import SamplingParams
    from specdec.tree import DraftTree
    from specdec.verify import verify

    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    prompt = list(prompt_ids)
    params, started, points = SamplingParams(), time.perf_counter(), {}
    state, root = backend.prefill(prompt[:-1]), prompt[-1]
    limit = backend.max_positions
    for nodes in profile_nodes(max_nodes, backend):
        if limit is not None and len(prompt) + nodes + reps + 2 > limit:
            break
        tree = DraftTree.chain([root] * nodes)
        times = []
        for rep in range(reps + 1):  # the first run warms up (allocations, kernels)
            if limit is not None and state.length + nodes + 2 > limit:
                state, root = backend.prefill(prompt[:-1]), prompt[-1]
            begin = time.perf_counter()
            root = verify(backend, state, root, tree, params, None).bonus_token
            if rep:
                times.append(time.perf_counter() - begin)
        points[nodes] = statistics.median(times)
        if time.perf_counter() - started > seconds and len(points) >= 2:
            warnings.warn(f"cost profile stopped at {nodes} nodes after {seconds:.0f} s; larger trees are "
                          f"extrapolated", RuntimeWarning, stacklevel=2)
            break
    if 0 not in points:
        raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room in the context window ({limit}) to "
                         f"profile a step")
    return points


@torch.no_grad()
def profile_plain(backend, prompt_ids: Sequence[int], longest: int = 8, reps: int = 5) -> dict[int, float]:
    """{steps: median seconds of a greedy plain run of that many steps} for the powers of two up to `longest`, on a
    backend that chains plain steps (`greedy_decode`); {} elsewhere. Timed on every new backend, not cached: the
    runs also capture the backend's chain graphs, so no timed plain run pays for a capture."""
    if not hasattr(backend, "greedy_decode"):
        return {}
    prompt, points = list(prompt_ids), {}
    state, root = backend.prefill(prompt[:-1]), prompt[-1]
    limit = backend.max_positions
    steps = 1
    while steps <= longest:
        times = []
        for rep in range(reps + 1):
            if limit is not None and state.length + steps + 1 > limit:
                if len(prompt) + steps + 1 > limit:
                    return points
                state, root = backend.prefill(prompt[:-1]), prompt[-1]
            begin = time.perf_counter()
            root = backend.greedy_decode(state, root, steps)[-1]
            if rep:
                times.append(time.perf_counter() - begin)
        points[steps] = statistics.median(times)
        steps *= 2
    return points


def cost_key(backend) -> dict:
    """What a profile depends on: the device, the model (a checksum), its dtype, the backend (and its
    `cost_revision`, where above 1) and its CPU linear kernel where it is not aten's."""
    model = backend.model
    if backend.device.type == "cuda":
        device = torch.cuda.get_device_name(backend.device)
    else:
        device = f"{_cpu_name()} x{torch.get_num_threads()} threads"
    key = {"device": device, "model": model_checksum(model), "dtype": str(next(model.parameters()).dtype),
           "backend": type(backend).__name__}
    revision = getattr(backend, "cost_revision", 1)
    if revision != 1:  # the backend's steps changed cost since profiles were first cached
        key["revision"] = revision
    linear = getattr(getattr(backend, "linear", None), "name", "aten")
    if linear != "aten":  # another kernel, another cost curve (aten's keys stay as they were)
        key["linear"] = linear
    key["sha"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return key


def model_checksum(model) -> str:
    """sha256 of the config and of the first 256 values of the first and last parameter tensors: the same model
    gives the same sum, another checkpoint of one architecture (almost surely) another."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    parameters = list(model.parameters())
    for tensor in (parameters[0], parameters[-1]):
        sample = tensor.detach().reshape(-1)[:256].float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _read_profile(path: Path, key: dict, max_nodes: int) -> dict[int, float] | None:
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            return None
        points = {int(n): float(s) for n, s in saved["points"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if 0 not in points or any(s <= 0 or not math.isfinite(s) for s in points.values()):
        return None
    if saved.get("max_nodes", 0) < max_nodes:
        return None  # profiled for smaller budgets than this one asks
    return points


def _write_profile(path: Path, key: dict, points: dict[int, float], max_nodes: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps({"key": key, "points": {str(n): s for n, s in sorted(points.items())},
                                       "max_nodes": max_nodes}, indent=1))
        os.replace(scratch, path)
    except OSError as error:  # a read-only cache costs a profile per process, not the generation
        warnings.warn(f"could not write the cost profile {path}: {error}", RuntimeWarning, stacklevel=2)
