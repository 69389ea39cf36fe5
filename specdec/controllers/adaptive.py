"""Cost-aware controllers: each turns the measured cost of a step and the learnt acceptance into a draft budget.

    goodput    (SmartSpec) every step, the budget that maximises expected committed tokens per second,
               (1 + E[accepted]) / (t_draft + t_verify + t_rest), over depths and node counts -- and the plain step
               (budget 0) when it is faster; after drafting, the subtree of the proposal with the best ratio
    tree_size  (Sequoia) the node budget n* = argmax (1 + E(n)) / t(n) of the best tree under the learnt positional
               acceptance and the profiled cost curve, re-solved as they drift; no per-step cut
    threshold  (DISCO, Kangaroo) no node whose chance of acceptance is below the cut that makes it worth its cost:
               cut = R * (marginal seconds of a node), R the measured tokens per second; applied between a model
               drafter's depths and to the proposal

Terms: E[accepted] of a tree = the sum of its nodes' values (`AcceptanceModel`); t_* from `CostModel` (profiled at
the first `prepare`, refined from every step). A **plain run** is budget 0: `plain_steps` plain autoregressive
steps (a chained greedy run where the backend has one). Whether to speculate at all is decided on *measured*
rates: tokens per second of the recent speculative steps (all their costs, steps whose drafter found nothing
included) against that of the recent plain runs; the models pick the budget, and stand in for a rate not yet
measured. (The models' predictions err by 10-20% per step, as much as the margin between the two on a GPU.) While
plain runs win, a **probe** (one speculative step, not cut) is drafted after `probe_every` plain tokens, then after
twice as many, up to `probe_max`; it drafts twice, and only the second step is measured (the first pays the
drafter's catch-up on what it missed -- a draft model's prefill -- as a sequence's first draft does, which is not
measured either). While speculation wins, a **plain probe** (one plain run of `plain_chain`) follows 4, then 8, ...
up to 128 speculative steps: the plain rate is measured in the loop it competes in, never only taken from the
profile (on an H200 the profiled chains missed the loop's own costs by enough that `recycling`, 0.85x of `ar`, never
ran plainly). Drafts come in runs (an n-gram match, a copied span): a speculative step that **paid** (its tokens per
second at least the plain rate) is followed by another, whatever the average says. A drafter whose measured draft
costs at most CHEAP_DRAFT of a plain token is **cheap** (model-free drafters): its probes are single measured steps
(no catch-up to pay), after 1, 2, 4, ... plain tokens, at most as many as make a probe that finds nothing cost
PROBE_SHARE of them, so a match is found within a few tokens of appearing (on an H100 the average alone kept `ngram`
100% plain: 0.99x of `ar` against 1.19x for a static depth 8). Under `goodput` a cheap drafter is **gated** instead:
it drafts at every decision, and `trim` verifies its tree only where the tree's expected tokens (learnt per
match-length class, `DraftTree.match_len`: a copy whose occurrence matches the context's last 20 tokens continues
far more often than one matching 1) per second of verification reach the plain rate, or the last step paid; else a
plain run runs instead (the generator's trim -> Budget), and a skipped class is checked now and then.
(`controller_replay.py` on two GPU runs' answers: 1.07-1.13x of `ar`, where the probes gave 1.02x and static depth
8 0.93x / 1.11x; the replay varies by ~5% run to run: the learning's cadence follows the host's timing.) Decisions
read host numbers only: no device sync is added."""

from __future__ import annotations

import abc

import time
from typing import Sequence

import numpy

from specdec.controllers.acceptance import RANKS, AcceptanceModel
from specdec.controllers.base import Budget, Frontier, StepStats, register_controller
from specdec.controllers.cost import CostModel, profile_plain
from specdec.tree import DraftTree, paths, subtree

SOLVE_DEPTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
SOLVE_SHARE = 0.005  # re-solving may cost at most this share of the steps' time
MEASURE_DECAY = 0.8  # the measured speculative / plain rates: moving sums over about the last 5 steps or runs
TOKENS_DECAY = 0.97  # tokens per speculative step: over about the last 30 steps (acceptance varies step to step)
TRIM_SAVING = 0.10  # cut a proposal only where a smaller tree can save this share of a step (flat curves: never)
LEARN_SHARE = 0.01  # the models learn from every k-th speculative step, k such that learning costs <= 1% of steps
LEARN_GAP_MAX = 8
PLAIN_PROBE_FIRST, PLAIN_PROBE_MAX = 4, 128  # speculative steps before a plain probe while speculation wins (doubling)
CHEAP_DRAFT = 0.5  # a drafter is cheap if its measured draft seconds are at most this share of a plain token's
PROBE_SHARE = 0.02  # a cheap drafter's probes (a step that finds nothing) may cost this share of the plain tokens
DRAFT_SHARE = 0.01  # while a cheap drafter's trees are skipped, its drafts may cost this share of the plain runs
SKIP_STREAK = 4  # ... once this many proposals in a row were skipped (before that: a draft after every run)
CHAIN_SAVING = 0.95  # a skipped tree runs a plain chain where its tokens cost at most this share of single steps'
DRAFT_DECAY = 0.8  # draft seconds, steps that did not pay: moving averages over about the last 5 of them
MATCH_CLASSES = (1, 2, 3, 4, 8)  # a copying drafter's match lengths, learnt apart: none, 1, 2, 3, 4-7, 8+


def _moving(average: float | None, value: float) -> float:
    """A DRAFT_DECAY moving average (the first value where there is none yet)."""
    return value if average is None else DRAFT_DECAY * average + (1.0 - DRAFT_DECAY) * value


class CostAware(abc.ABC):
    """What the cost-aware controllers share: the models, the measured rate, plain runs and probes.

    max_depth, max_nodes: the largest budget considered; profile_reps: runs per profiled size (median);
    profile_seconds: the profile's time limit (None: 60 s on a GPU, 30 s on a CPU); probe_every / probe_max: the
    plain tokens before the first / at most between probes; resolve_every: steps between re-solving the budget;
    plain_chain: the most plain steps per plain run (greedy runs them as one device chain where the backend can:
    one host round trip for all, as the `ar` baseline's chains of 8; runs are powers of two, each a graph captured
    at `prepare`; a run past the answer's end wastes at most plain_chain - 1 steps)."""

    plain_fallback = True
    gated = False  # cheap drafters' trees are gated after drafting (`_gate`)

    def __init__(self, max_depth: int = 16, max_nodes: int = 64, profile_reps: int = 10,
                 profile_seconds: float | None = None, probe_every: int = 8, probe_max: int = 256,
                 resolve_every: int = 16, plain_chain: int = 8):
        for name, value in (("max_depth", max_depth), ("max_nodes", max_nodes), ("profile_reps", profile_reps),
                            ("probe_every", probe_every), ("resolve_every", resolve_every),
                            ("plain_chain", plain_chain)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if probe_max < probe_every:
            raise ValueError(f"probe_max ({probe_max}) must be >= probe_every ({probe_every})")
        if profile_seconds is not None and profile_seconds <= 0:
            raise ValueError(f"profile_seconds must be > 0, got {profile_seconds}")
        self.max_depth, self.max_nodes, self.plain_chain = max_depth, max_nodes, plain_chain
        self.profile_reps, self.profile_seconds = profile_reps, profile_seconds
        self.probe_every, self.probe_max, self.resolve_every = probe_every, probe_max, resolve_every
        self.cost: CostModel | None = None
        self.acceptance = AcceptanceModel(max(max_depth, 1))
        self._backend, self._seen_tree = None, False
        self._width = RANKS  # branching seen in proposals (max rank + 1); until the first, any
        self._tokens = self._seconds = 0.0  # moving sums of committed tokens and step seconds: the rate R
        self._since_draft, self._probe_gap, self._probing = 0, 0, False  # gap 0: set when plain runs start
        self._choice: Budget | None = None
        self._choice_rate = 0.0
        self._steps_since_solve, self._solve_gap, self._trim_from, self._steps_weight = 0, 1, 0, 0.0
        self._solves = 0
        self._measured = {"spec": (0.0, 0.0), "plain": (0.0, 0.0)}  # moving sums of (tokens or steps, seconds)
        self._spec_tokens = (0.0, 0.0)  # moving sums of (tokens, steps) over every speculative step
        self._unmeasured, self._follow_up, self._probe_measure = True, False, False
        self._verify_table, self._verify_list = numpy.zeros(0), []
        self._since_learn, self._learn_gap = 0, 1  # steps since the models last learnt / between their lessons
        self._spec_steps, self._plain_gap = 0, PLAIN_PROBE_FIRST  # speculative steps since / before a plain probe
        self._counters = dict(controller_s=0.0, plain_tokens=0, probes=0, plain_probes=0, trimmed_nodes=0)
        self._mark = (0.0, 0)  # the cost model's error sums when this generation began
        self._draft_avg = None  # moving average of a speculative step's draft seconds (None: none measured)
        self._last_paid = False  # the last measured speculative step made tokens at least at the plain rate
        self._miss_avg = None  # moving average of the seconds of measured speculative steps that did not pay
        self._sequence_start = False  # no speculative step yet in this sequence (`prepare` sets it)
        self._by_match: dict[int, AcceptanceModel] = {}  # acceptance per match-length class (`DraftTree.match_len`)
        self._gate_checks: dict[int, list[int]] = {}  # per match class: [proposals skipped since one was verified,
        self._skipping, self._runs_since_draft = 0, 0  # skips before the next check]; proposals skipped in a row
        self._verify_scale = None  # measured / predicted seconds of a step's verify and rest (moving average)
        self._gate_run = plain_chain  # a skipped tree's plain run: a chain where chaining pays, else one step

    # ---- the generator's hooks ------------------------------------------------------------------------------------

    def prepare(self, backend, prompt_ids: Sequence[int]) -> None:
        """Profile the target on first use (or load the cached profile) and start a generation's counters."""
        started = time.perf_counter()
        if backend is not self._backend:
            buckets = getattr(backend, "buckets", None)
            if buckets:
                self.max_nodes = min(self.max_nodes, max(buckets) - 1)
            self.cost = CostModel.load_or_profile(backend, prompt_ids, self.max_nodes, self.profile_reps,
                                                  self.profile_seconds)
            chains = profile_plain(backend, prompt_ids, self.plain_chain)
            self.cost.seed_plain(chains)
            longest = max(chains, default=1)  # chained plain tokens cost less (a graph backend's one host read):
            self._gate_run = longest if chains and chains[longest] / longest <= CHAIN_SAVING * chains[1] else 1
            self._backend, self._choice = backend, None
        total, steps = self.cost._errors
        self._mark = (total, steps)
        self._unmeasured = self._sequence_start = True  # a new sequence: the first draft includes its prefill
        self._counters = dict(controller_s=0.0, plain_tokens=0, probes=0, plain_probes=0, trimmed_nodes=0)
        self._counters["profile_s"] = time.perf_counter() - started

    def budget(self, history: Sequence[StepStats]) -> Budget:
        started = time.perf_counter()
        try:
            return self._budget()
        finally:
            self._counters["controller_s"] += time.perf_counter() - started

    def observe(self, step: StepStats) -> None:
        started = time.perf_counter()
        self._since_learn += 1
        if self._since_learn >= self._learn_gap or step.plain_steps:  # (a catch-up's draft is not a draft's cost)
            catch_up = not step.plain_steps and (self._sequence_start or self._unmeasured and not self._cheap())
            self._learn(step, draft=not catch_up)
            spent = time.perf_counter() - started
            seconds = step.step_s or step.draft_s + step.verify_s
            self._since_learn = 0
            if not step.plain_steps and seconds > 0:
                self._learn_gap = min(max(1, int(spent / (LEARN_SHARE * seconds))), LEARN_GAP_MAX)
        tokens = step.plain_steps or step.accepted_len + 1
        seconds = step.step_s or step.draft_s + step.verify_s
        self._tokens, self._seconds = 0.9 * self._tokens + tokens, 0.9 * self._seconds + seconds
        self._steps_weight = 0.9 * self._steps_weight + 1.0
        if step.plain_steps:
            self._since_draft += step.plain_steps
            self._counters["plain_tokens"] += step.plain_steps
            self._measure("plain", tokens, seconds, MEASURE_DECAY)
            self._unmeasured = True
        else:
            kept_tokens, kept_steps = self._spec_tokens  # its tokens count, whatever its seconds
            self._spec_tokens = (TOKENS_DECAY * kept_tokens + tokens, TOKENS_DECAY * kept_steps + 1.0)
            if self._unmeasured and not self._cheap():  # a sequence's first draft, or the first after plain runs:
                self._unmeasured = False  # it pays the drafter's catch-up (a draft model's prefill of what it
                self._follow_up = self._since_draft > 0  # missed), not a step's cost; a probe's second step is
                self._since_draft = 0  # the measured one
                self._last_paid = False
            else:  # a probe's measured step weighs more: it is the only news of speculation while plain runs win
                self._unmeasured, self._since_draft = False, 0
                self._last_paid = seconds > 0 and tokens / seconds >= self._plain_rate()
                if not self._sequence_start:  # (a cheap drafter's first draft of a sequence indexes its prompt)
                    self._measure("spec", 1.0, seconds, 0.5 if self._probe_measure else MEASURE_DECAY)
                    self._probe_measure = False
                    if not self._last_paid:
                        self._miss_avg = _moving(self._miss_avg, seconds)
                    self._draft_avg = _moving(self._draft_avg, step.draft_s)
                    predicted = self.cost.verify_s(step.drafted_nodes) + self.cost.other if self.cost else 0.0
                    if predicted > 0 and seconds > step.draft_s:
                        self._verify_scale = _moving(self._verify_scale, (seconds - step.draft_s) / predicted)
            self._sequence_start = False
        self._steps_since_solve += 1
        self._counters["controller_s"] += time.perf_counter() - started

    def _learn(self, step: StepStats, draft: bool = True) -> None:
        """The models learn from a step: the cost model its times (draft=False: not its draft seconds, a catch-up),
        the acceptance model its verified tree."""
        if self.cost is not None:
            self.cost.observe(step, draft)
        if step.tree is not None and step.drafted_nodes:
            parents = step.tree.host_parents
            self.acceptance.observe(parents, step.accepted_nodes)
            if self.gated:  # per match-length class; class 0 (no match given) too, apart from the matched trees
                self._match_model(step.tree.match_len).observe(parents, step.accepted_nodes)
            if not self._seen_tree or self._width < RANKS:
                width = int(self.acceptance.shape(parents)[1].max()) + 1
                self._width = width if not self._seen_tree else max(self._width, width)
                self._seen_tree = True

    def keep_drafting(self, frontier: Frontier) -> bool:
        """Expand the frontier iff its children's expected tokens are worth their draft and verify seconds at the
        measured rate: Σ scores * rate(next depth) > R * (t_draft(d + 1) - t_draft(d) + t_verify increase)."""
        if self.cost is None or not self._seconds or not frontier.scores:
            return True
        started = time.perf_counter()
        depth, cost = frontier.depth, self.cost
        rates = self.acceptance.rates()
        gain = sum(frontier.scores) * rates[min(depth + 1, rates.shape[0] - 1), 0]
        nodes = max(frontier.nodes, depth)
        extra = (cost.draft_s(depth + 1) - cost.draft_s(depth)
                 + cost.verify_s(nodes + len(frontier.scores)) - cost.verify_s(nodes))
        self._counters["controller_s"] += time.perf_counter() - started
        return gain > self.rate() * extra

    def report(self) -> dict:
        """This generation's numbers: the cost model's error on its steps, the controller's own seconds, ..."""
        out = dict(self._counters)
        steps, seconds = self._measured["spec"]  # what the gate compares (moving sums), for a run's diagnosis
        out["spec_step_ms"] = 1e3 * seconds / steps if steps else 0.0
        out["plain_token_ms"] = 1e3 / self._plain_rate() if self.cost is not None else 0.0
        out["draft_ms"] = 1e3 * (self._draft_avg or 0.0)
        out["cheap"], out["probe_gap"] = int(self._cheap()) if self.cost is not None else 0, self._probe_gap
        out["gate_gap"] = max((gap for _, gap in self._gate_checks.values()), default=0)
        if self.cost is not None:
            total, steps = self.cost._errors
            steps -= self._mark[1]
            out["cost_steps"] = steps
            out["cost_mape"] = (total - self._mark[0]) / steps if steps else 0.0
        return out

    def rate(self) -> float:
        """R: committed tokens per second over the recent steps (moving sums)."""
        return self._tokens / self._seconds if self._seconds else 0.0

    # ---- shared decision parts --------------------------------------------------------------------------------

    def _budget(self) -> Budget:
        if self.cost is None:  # used without `prepare`: nothing measured, a generous draft
            return Budget(self.max_nodes, self.max_depth)
        if self._choice is None or self._steps_since_solve >= self._solve_gap or self._probing:
            self._resolve()
        self._probing = False
        if not self.plain_fallback:
            return self._choice
        if self._follow_up:  # the probe's second, measured step
            self._follow_up, self._probing, self._probe_measure = False, True, True
            return self._choice
        if self._gating():  # a cheap drafter drafts at every decision (`trim` decides between its tree and plain
            if self._skipping >= SKIP_STREAK and self._runs_since_draft < self._draft_gap():  # runs), or every few
                self._runs_since_draft += 1  # while its trees are skipped, so drafting costs at most DRAFT_SHARE
                return Budget(0, 0, plain_steps=self._gate_run)
            return self._choice
        # drafts come in runs (a match, a copied span): a step that paid is likely to be followed by another
        if self._last_paid or self._spec_rate() >= self._plain_rate() or self._choice.max_nodes == 0:
            self._probe_gap = 0
            if self._choice.max_nodes and self._spec_steps >= self._plain_gap:  # probe a plain run: its rate is
                self._spec_steps = 0  # measured, not taken from the profile (which can miss the loop's own costs)
                self._plain_gap = min(2 * self._plain_gap, PLAIN_PROBE_MAX)
                self._counters["plain_probes"] += 1
                return Budget(0, 0, plain_steps=self.plain_chain)
            self._spec_steps += 1
            return self._choice
        self._plain_gap = PLAIN_PROBE_FIRST
        cheap = self._cheap()
        if not self._probe_gap:  # plain runs start: the first probe after 1 plain token (a cheap drafter) or more
            self._probe_gap = 1 if cheap else self.probe_every
        if self._since_draft >= self._probe_gap:  # probe: draft once, uncut, so the acceptance model learns
            self._probe_gap = min(2 * self._probe_gap, self._cheap_gap() if cheap else self.probe_max)
            self._probing = True
            self._counters["probes"] += 1
            return self._choice
        steps = min(self.plain_chain, self._probe_gap - self._since_draft)
        return Budget(0, 0, plain_steps=1 << (steps.bit_length() - 1))  # a power of two: few device chains to capture

    def _gating(self) -> bool:
        """Decide after drafting (`gated` controllers, cheap drafters): the draft costs ~nothing, and its tree (how
        long a match it copies) says more about the next step than any average."""
        return self.gated and self.plain_fallback and self._cheap()

    def _gate(self, tree: DraftTree) -> DraftTree | Budget:
        """The proposal's best-ratio subtree if its expected tokens per second of verification (the draft is spent;
        the cost model's seconds scaled by what the steps measured) reach the measured plain rate, or the last step
        paid (matches come in runs); else a plain run (`_gate_run`: `plain_chain` where the backend's chained tokens
        cost less than single steps, else one step). The acceptance is the tree's match-length class's (class 0: the
        trees that give none, learnt apart from the matched ones; `fused` leads with either). After a class's `gap`
        skipped proposals the next is verified anyway (its best cut, else its first path), the gap doubling up to
        where such a check costs PROBE_SHARE of the runs' tokens, so a class judged poor keeps being measured."""
        plain = Budget(0, 0, plain_steps=self._gate_run)
        self._skipping += 1
        self._runs_since_draft = 1
        if not len(tree):
            return plain
        model = self._match_model(tree.match_len)
        cut, ratio = self._cut_to_ratio(tree, 0.0, model)  # the cost model's seconds, scaled to the measured
        checks = self._gate_checks.setdefault(_match_class(tree.match_len), [0, 1])
        if self._last_paid or len(cut) and ratio >= self._plain_rate() * (self._verify_scale or 1.0):
            checks[0], self._skipping = 0, 0
        else:
            checks[0] += 1
            if checks[0] <= checks[1]:
                return plain
            checks[:] = [0, min(2 * checks[1], self._cheap_gap(self._gate_run))]
            self._counters["probes"] += 1
        return cut if len(cut) else _first_path(tree)  # (an empty cut: one path at most)

    def _draft_gap(self) -> int:
        """Plain runs per draft while trees are skipped: a draft (its measured seconds) costs at most DRAFT_SHARE of
        the runs' tokens."""
        draft_tokens = (self._draft_avg or 0.0) * self._plain_rate()
        return 1 + int(draft_tokens / (DRAFT_SHARE * self._gate_run))

    def _match_model(self, match_len: int) -> AcceptanceModel:
        key = _match_class(match_len)
        model = self._by_match.get(key)
        if model is None:
            model = self._by_match[key] = AcceptanceModel(self.acceptance.tested.shape[0] - 1)
        return model

    def _cheap(self) -> bool:
        """The drafter's measured draft seconds are at most CHEAP_DRAFT of a plain token's: probing costs ~nothing."""
        return self._draft_avg is not None and self._draft_avg * self._plain_rate() <= CHEAP_DRAFT

    def _cheap_gap(self, tokens_each: int = 1) -> int:
        """The most plain tokens (runs of `tokens_each`) between a cheap drafter's probes: enough that a probe that
        does not pay (the measured seconds of such steps, less a plain token's) costs at most PROBE_SHARE of them."""
        miss_s = self._miss_avg  # measured; else the cost model's step of no nodes
        if miss_s is None:
            miss_s = self.cost.verify_s(0) + self.cost.other + (self._draft_avg or 0.0)
        extra = miss_s * self._plain_rate() - 1.0  # in plain tokens
        return int(min(max(round(extra / (PROBE_SHARE * tokens_each)), 1), self.probe_max))

    def _spec_rate(self) -> float:
        """Tokens per second of speculative steps: tokens per step averaged over the last ~30 of them (one probe's
        step or two, most accepting nothing for a drafter that often finds no match, would say nothing reliable)
        over seconds per step measured on the recent ones (their every cost, steps that drafted nothing included);
        else the solved budget's expected rate."""
        steps, seconds = self._measured["spec"]
        tokens, counted = self._spec_tokens
        return (tokens / counted) / (seconds / steps) if seconds and counted else self._choice_rate

    def _plain_rate(self) -> float:
        """Tokens per second of plain runs: measured, else the cost model's."""
        tokens, seconds = self._measured["plain"]
        return tokens / seconds if seconds else self.plain_chain / self.cost.plain_s(self.plain_chain)

    def _measure(self, kind: str, tokens: float, seconds: float, decay: float) -> None:
        old_tokens, old_seconds = self._measured[kind]
        self._measured[kind] = (decay * old_tokens + tokens, decay * old_seconds + seconds)

    def _resolve(self) -> None:
        """Re-solve the budget; the next solve waits 1, 2, ... up to `resolve_every` steps, or longer where solving
        would cost more than SOLVE_SHARE of the steps' time; trees smaller than `_trim_from` are not worth cutting
        (on a flat cost curve, a GPU's, none is: the cut would cost more host time than it saves)."""
        started = time.perf_counter()
        self._verify_table = self.cost.verify_table(self.max_nodes)
        self._verify_list = self._verify_table.tolist()
        self._choice, self._choice_rate = self._solve()
        self._steps_since_solve = 0
        step_s = self._seconds / max(self._steps_weight, 1e-9) if self._seconds else 0.0
        spent = time.perf_counter() - started
        self._solves += 1  # early on (little evidence yet) re-solve sooner: after 1, 2, 3, ... steps
        self._solve_gap = max(min(self._solves, self.resolve_every),
                              int(spent / (SOLVE_SHARE * step_s)) if step_s else 0)
        saving, base = TRIM_SAVING * (step_s or self._verify_list[-1]), self._verify_list[1 if self.max_nodes else 0]
        self._trim_from = next((n for n, t in enumerate(self._verify_list) if n > 1 and t - base > saving),
                               self.max_nodes + 1)

    @abc.abstractmethod
    def _solve(self) -> tuple[Budget, float]:
        """(the best speculative budget, its expected tokens per second)."""

    def _best_first(self) -> tuple[numpy.ndarray, numpy.ndarray]:
        return self.acceptance.best_tree(self.max_nodes + self.max_depth, self.max_depth, min(self._width, RANKS))

    def _ratios(self, values: numpy.ndarray, depth: int) -> numpy.ndarray:
        """(1 + E(n)) / t(n) for n = 1..len(values): the best n nodes (values best first) within `depth`."""
        n = min(len(values), self.max_nodes)
        gains = 1.0 + numpy.cumsum(values[:n])
        seconds = self._verify_table[1:n + 1] + self.cost.draft_s(depth) + self.cost.other
        return gains / seconds

    def _cut_to_ratio(self, tree: DraftTree, draft_s: float,
                      model: AcceptanceModel | None = None) -> tuple[DraftTree, float]:
        """The subtree of the highest-valued nodes whose count maximises (1 + E) / (t_draft + t_verify + t_rest),
        and that ratio. Plain Python: for trees of tens of nodes it is several times faster than numpy's per-call
        overhead."""
        values = (model or self.acceptance).values(tree.host_parents).tolist()
        order = sorted(range(len(values)), key=lambda node: -values[node])  # stable: parents, earlier siblings first
        table, fixed = self._verify_table, draft_s + self.cost.other
        verify_s = self._verify_list if len(tree) < len(table) else [self.cost.verify_s(n) for n in range(len(tree) + 1)]
        gain, best, best_ratio = 1.0, 0, 1.0 / (verify_s[0] + fixed)
        for count, node in enumerate(order, start=1):
            gain += values[node]
            ratio = gain / (verify_s[count] + fixed)
            if ratio > best_ratio:
                best, best_ratio = count, ratio
        return self._keep(tree, order[:best]), best_ratio

    def _keep(self, tree: DraftTree, keep) -> DraftTree:
        if len(keep) == len(tree):
            return tree
        self._counters["trimmed_nodes"] += len(tree) - len(keep)
        return subtree(tree, [int(node) for node in keep])


def _match_class(match_len: int) -> int:
    """The MATCH_CLASSES entry a match length falls in (0: no match length given)."""
    return max((c for c in MATCH_CLASSES if c <= match_len), default=0)


def _first_path(tree: DraftTree) -> DraftTree:
    """The tree's first root-to-leaf path (`paths`' first, as a chain)."""
    return subtree(tree, paths(tree)[0]) if len(tree) else tree


@register_controller("goodput")
class GoodputController(CostAware):
    """SmartSpec's goodput, per step, over depths and node counts, with the plain step as an option (module
    docstring); the proposal is then cut to its best-ratio subtree. A cheap drafter drafts at every decision and
    its tree is verified only where it is expected to beat a plain run (`_gate`)."""

    gated = True

    def _solve(self) -> tuple[Budget, float]:
        """For every solve depth d at once (a row each): the best-first nodes within d, their running gain 1 + E(n)
        and cost t_verify(n) + t_draft(d) + t_rest -> the (n, d) of the highest ratio (ties: the shallower, then
        the fewer nodes). One pass of array operations: re-solving runs after every probe."""
        values, depths = self._best_first()
        solve_depths = numpy.array([depth for depth in SOLVE_DEPTHS if depth <= self.max_depth])
        if not len(values) or not len(solve_depths):
            return Budget(1, 1), -1.0
        inside = depths[None, :] <= solve_depths[:, None]  # (D, N): node k lies within depth d
        counts = numpy.cumsum(inside, axis=1)  # at each node within d: how many nodes the budget has up to it
        gains = 1.0 + numpy.cumsum(numpy.where(inside, values[None, :], 0.0), axis=1)
        fixed = numpy.array([self.cost.draft_s(int(depth)) for depth in solve_depths]) + self.cost.other
        seconds = self._verify_table[numpy.minimum(counts, self.max_nodes)] + fixed[:, None]
        ratios = numpy.where(inside & (counts <= self.max_nodes), gains / seconds, -numpy.inf)
        row, column = divmod(int(numpy.argmax(ratios)), ratios.shape[1])
        if not numpy.isfinite(ratios[row, column]):
            return Budget(1, 1), -1.0
        return Budget(int(counts[row, column]), int(solve_depths[row])), float(ratios[row, column])

    def trim(self, tree: DraftTree, draft_s: float) -> DraftTree | Budget:
        if self.cost is None:
            return tree
        started = time.perf_counter()
        if self._gating():
            cut = self._gate(tree)
        elif len(tree) < max(self._trim_from, 1) or self._probing:
            cut = tree
        else:
            cut = self._cut_to_ratio(tree, draft_s)[0]
        self._counters["controller_s"] += time.perf_counter() - started
        return cut


@register_controller("tree_size")
class TreeSizeController(CostAware):
    """Sequoia / PPD: the best tree's node budget under the positional acceptance and the cost curve, re-solved
    every `resolve_every` steps; the drafter fills it, nothing is cut."""

    def _solve(self) -> tuple[Budget, float]:
        values, depths = self._best_first()
        ratios = self._ratios(values, self.max_depth)
        n = int(numpy.argmax(ratios)) + 1
        return Budget(n, int(depths[:n].max())), float(ratios[n - 1])


@register_controller("threshold")
class ThresholdController(CostAware):
    """DISCO / Kangaroo with the cut from the cost model: a node is drafted and verified only while its chance of
    acceptance is at least R * (its marginal seconds). No plain runs: a proposal cut to nothing is a plain step."""

    plain_fallback = False

    def _solve(self) -> tuple[Budget, float]:
        return Budget(self.max_nodes, self.max_depth, min_confidence=self._cut()), 0.0

    def _cut(self) -> float:
        """R * (one more node's verify seconds + a draft depth's seconds shared by the drafter's width)."""
        table = self._verify_table
        per_node = max((table[-1] - table[0]) / max(len(table) - 1, 1), 0.0)
        per_depth = self.cost.draft_s(2) - self.cost.draft_s(1)
        return min(self.rate() * (per_node + max(per_depth, 0.0) / self._width), 1.0)

    def trim(self, tree: DraftTree, draft_s: float) -> DraftTree:
        if self.cost is None or len(tree) < max(self._trim_from, 1):
            return tree
        started = time.perf_counter()
        values = self.acceptance.values(tree.host_parents)
        keep = numpy.flatnonzero(values >= self._cut())  # values fall along paths: a closed subtree
        cut = self._keep(tree, keep)
        self._counters["controller_s"] += time.perf_counter() - started
        return cut
