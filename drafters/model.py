"""`model`: a small causal LM sharing the target's tokenizer drafts a chain or a dynamic tree (SpS, FastDraft; the
tree after EAGLE-2 / DySpec).

The draft model keeps its own KV cache (`draft_kv`: a DynamicCache, or with graphs=True a static cache whose every
step is a CUDA graph replay) of the **committed** tokens it has consumed (`self.cached`).
`propose` feeds what the context added since (normally the accepted tokens it had not run yet + the bonus, now the
root), then grows the tree one depth per forward: the **frontier** (the best nodes of the newest depth) runs as one
tree forward over the cache (4D float mask, depth position ids, as the target verifies) and each frontier node gets
its `topk` most likely children. `observe` keeps the accepted path's tree KV (rows moved behind the committed
tokens, the rest cropped) — never a re-prefill.

**Scores.** A candidate's score is the product of its **slot probabilities** along its path, where slot j of a
node is the j-th largest probability of the draft's distribution there; in tree mode each factor is first mapped to
the acceptance rate measured so far for that slot and probability (`calibration.Calibration`, learnt online from
the verified trees; `calibrate=False` keeps the raw probabilities). The final tree is the `max_nodes` best
candidates (global best-first; ties: shallower, then older first), so it holds every kept node's parent. A node is
expanded only while it is among the `max_nodes - 1` best (else no child of it could enter the tree) and scores at
least `budget.min_confidence`; low-confidence nodes stay in the tree as leaves.

**Sampling (temperature > 0).** q = `target_probs(draft logits, params)`; slot j's token is drawn from q without the
tokens of slots 1..j-1 (renormalised), and that row is its `draft_probs`. Scoring a sample by its own token's
probability would bias which samples are kept (the tests see it); slot probabilities do not: a node's score does not
depend on its token, and nothing that does (its subtree, its later siblings) can outrank it. So each kept node is an
exact draw from its reported q, and kept siblings are the first slots, in order: what recursive rejection sampling
needs to stay lossless.

Example (greedy, topk=2, max_nodes=3): the root's children a .6, b .3; the frontier [a, b] runs; a's children
c .6*.45 = .27, d .6*.4 = .24, b's at most .3*.5 -> the 3 best: tree [a, b, c], parents [-1, -1, 0]; 2 forwards.
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
from dataclasses import dataclass

import numpy
import torch
from specdec.backends.cpu_linear import LinearKernel
from specdec.backends.gqa_attention import GQAAttention
from specdec.backends.hf import cache_keyword, context_window
from specdec.controllers.base import Budget, Frontier
from specdec.drafters.base import DraftContext, TargetView, register_drafter
from specdec.drafters.calibration import Calibration
from specdec.drafters.cost_stop import CostStop
from specdec.drafters.draft_kv import DynamicKV, GraphKV
from specdec.sampling import SamplingParams, target_probs
from specdec.tree import DraftTree

_SEED_SALT = 0x5DEECE66D  # the draft sampler's stream must not replay the acceptance generator's (same seed)


@dataclass
class _Node:
    token: int
    parent: int                  # candidate index, -1 = the root
    depth: int
    score: float                 # product along the path of slot probabilities (calibrated: acceptance rates)
    q: torch.Tensor | None       # (V,) the distribution the token was drawn from; None = deterministic top-k
    slot: int = -1               # cache row of its KV once it ran as frontier, -1 = never ran
    rank: int = 0                # its slot among its siblings: 0 = the parent's most likely child
    prob: float = 1.0            # its slot probability (score / the parent's score, before calibration)


@register_drafter("model")
class ModelDrafter:
    """model: a `PreTrainedModel`, or a local path / model id loaded at first use onto the target's device in the
    target's dtype (`path=` says the same in spec strings: "model:path=/dir/of/draft,mode=chain").
    mode: "tree" (dynamic tree) or "chain". topk: children per expanded node and nodes expanded per depth.
    graphs: keep the draft KV in a static cache and run every draft forward as a CUDA graph (`GraphBackend`; the
    same code runs eagerly off CUDA) instead of HF's eager forward over a DynamicCache.
    calibrate: score nodes by their acceptance rate learnt from this drafter's verified drafts (`calibration`)
    instead of the draft's probabilities (False: probabilities, EAGLE-2's score); a chain's scores only matter to a
    confidence stop (`budget.min_confidence`, a controller's `keep_drafting`, the cost stop).
    cost_stop: stop drafting deeper once a draft forward is expected to cost more time than it saves (`cost_stop`;
    within the controller's budget; a greedy chain on graphs, drafted in one replay, is never cut).
    online: learn from the target's verdicts while serving (`specdec.train.online`; the served weights change only
    between generations): online_lr, online_every (buffered positions per update), online_loss ("fkl", "tvd",
    "jsd"), online_epochs (passes over each update's data), online_background (train in a worker thread instead of
    inline between generations), online_checkpoint (a file, saved after each update and resumed from); `version`
    counts the weights published so far. batched: in batched decoding, draft every row's chain together
    (`batch_proposer`; False: each row drafts alone)."""

    learns_online = True  # make_drafter refuses online=True for drafters without it
    threshold = 0.0  # expand a node only while its own slot probability reaches this (early_exit raises it)
    device_chain = True  # greedy chains on GraphKV: `_greedy_chain` (one graph, one read); False: `_grow`'s loop

    def __init__(self, model=None, path: str | None = None, mode: str = "tree", topk: int = 4, graphs: bool = False,
                 calibrate: bool = True, cost_stop: bool = False, online: bool = False, online_lr: float = 3e-4,
                 online_every: int = 2048, online_loss: str = "fkl", online_epochs: int = 1,
                 online_background: bool = False, online_checkpoint: str | None = None, batched: bool = True):
        self._set_drafting(mode, topk, calibrate, cost_stop)
        self.batched = batched
        self._set_online(online, lr=online_lr, every=online_every, loss=online_loss, epochs=online_epochs,
                         background=online_background, checkpoint=online_checkpoint)
        source = path if model is None else model
        if source is None:
            raise ValueError("the model drafter needs a draft model: pass model=<PreTrainedModel> or path=<dir>")
        if isinstance(source, (str, os.PathLike)):
            from transformers import AutoConfig

            from specdec.models import resolve_model

            self.model, self.path = None, resolve_model(source)
            self.vocab_size = AutoConfig.from_pretrained(self.path).vocab_size
        else:
            self.model, self.path = source.eval(), None
            self.vocab_size = source.get_output_embeddings().weight.shape[0]
        self.graphs, self.kv = bool(graphs), None
        self._linear: LinearKernel | None = None  # the CPU linear kernel of the model's forwards (made on the first)
        self._gqa: GQAAttention | None = None       # and their attention under a tree mask
        if self.model is not None:
            self._start_learning()
        self.reset()

    def _set_online(self, online: bool, **options) -> None:
        """Check the online-learning options now (bad ones fail at construction); the learner starts once the
        drafter has its model (`_start_learning`)."""
        from specdec.train.online import OnlineConfig

        self.learner = None
        self.online_config = OnlineConfig(**options) if online else None

    def _start_learning(self) -> None:
        from specdec.train.online import ModelStudent, OnlineLearner

        if self.online_config is not None and self.learner is None:
            with torch.inference_mode(False):  # propose() may bind the model: the shadow must be a normal tensor
                self.learner = OnlineLearner(ModelStudent(self.model), self.online_config)

    def bind(self, target: TargetView) -> None:
        """Load the draft model now (and start its learner) instead of at the first `propose`."""
        if self.model is None:
            self._load(target)

    def batch_proposer(self, batch_size: int, max_len: int, target: TargetView, native=False):
        """Batched decoding (`specdec.batch`): one `BatchedChains` drafting every row's greedy chain with one forward
        per depth, or None where the rows' drafts are more than fixed greedy chains (a tree, online learning, the
        cost stop): each row then proposes alone."""
        if not self.batched or self.width != 1 or self.online_config is not None or self.cost is not None:
            return None
        from specdec.drafters.model_batch import BatchedChains

        self.bind(target)
        return BatchedChains(self.model, batch_size, max_len, native)

    @property
    def version(self) -> int:
        """The weights serving now: 0 = as loaded, n = the n-th published by online learning."""
        return 0 if self.learner is None else self.learner.version

    def _teach(self, result, learnt) -> None:
        """Hand the learner this step's verified draft (ours) with its context: the committed tokens to the root."""
        if self.learner is None or learnt is None:
            return
        tree = result.tree
        tokens = tree.host_tokens if tree.host_tokens is not None else tree.tokens.tolist()
        self.learner.record(self.cached, tokens, tree.host_parents, result.accepted_nodes, result.bonus_token,
                            result.logits)

    def _set_drafting(self, mode: str, topk: int, calibrate: bool, cost_stop: bool) -> None:
        """Check and set how the draft grows: its width, the tree scores' calibration, the cost stop."""
        if mode not in ("tree", "chain"):
            raise ValueError(f"mode must be 'tree' or 'chain', got {mode!r}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.width = 1 if mode == "chain" else topk
        self.calibration = Calibration() if calibrate else None
        self.cost = CostStop() if cost_stop else None

    def reset(self) -> None:
        """A new sequence (a request boundary: where an online learner publishes new weights)."""
        if getattr(self, "learner", None) is not None:
            self.learner.end_sequence()
        if self.kv is not None:
            self.kv.keep(0)
        self.cached: list[int] = []   # the committed tokens whose KV `kv` holds (its first rows)
        self._proposal: tuple | None = None  # tokens, parents, cache rows, (rank, slot probability) per node
        self._rng: torch.Generator | None = None
        self._device: torch.device | None = None  # the draft model's, looked up once per sequence
        self._record_hidden = False  # this step's controller reads hidden states (`_frontier_hidden`)
        self._hidden: torch.Tensor | None = None  # (T, H) the last forward's last hidden states, when recorded

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        if self.model is None:
            self._load(ctx.target)
        if self.cost is not None:
            if self._rng is None:
                self.cost.new_sequence()
            self.cost.step_started(time.perf_counter())
        if self._rng is None:  # a new sequence
            self._device = self.model.device
            self._rng = torch.Generator(self._device)
            self._rng.seed() if ctx.params.seed is None else self._rng.manual_seed(ctx.params.seed ^ _SEED_SALT)
        token_ids = ctx.token_ids if isinstance(ctx.token_ids, list) else list(map(int, ctx.token_ids))
        budget = self._within_window(ctx.budget, len(token_ids))
        if budget is None:  # the draft model's context is full: plain steps from here on, no error
            return DraftTree.empty()
        self._record_hidden = not self.graphs and getattr(getattr(ctx.keep_drafting, "__self__", None),
                                                          "wants_hidden", False)
        self._hidden = None
        try:
            root_logits = self._catch_up(token_ids)
            nodes, kept = self._grow(root_logits, budget, ctx.params, ctx.keep_drafting)
        except Exception:
            self.cached = []  # a forward that failed part-way leaves layers uneven: the next propose starts anew
            if self.kv is not None:
                self.kv.keep(0)
            raise
        order = sorted(kept, key=lambda i: (nodes[i].depth, i))  # topological, siblings in slot order
        index = {node: new for new, node in enumerate(order)}
        tokens = [nodes[i].token for i in order]
        parents = [-1 if nodes[i].parent < 0 else index[nodes[i].parent] for i in order]
        self._proposal = (tokens, parents, [nodes[i].slot for i in order],
                          [(nodes[i].rank, nodes[i].prob) for i in order])
        probs = None if ctx.params.greedy or not order else torch.stack([nodes[i].q for i in order])
        host = torch.from_numpy(numpy.array([tokens, parents], dtype=numpy.int64))
        tokens_and_parents = host.to(self._device)  # one host-to-device copy for both
        return DraftTree(tokens_and_parents[0], tokens_and_parents[1], probs, ("model",) * len(order),
                         host_parents=tuple(parents), host_tokens=tuple(tokens))

    @torch.inference_mode()
    def observe(self, result) -> None:
        """Learn from the verified tree; move the accepted path's tree KV (where it ran) behind the committed tokens;
        drop the rest."""
        learnt = self._learn(result)
        self._teach(result, learnt)
        if learnt is not None:
            (tokens, _, slots, _), accepted = learnt
            path = list(itertools.takewhile(lambda node: slots[node] >= 0, accepted))
            if path:
                self.kv.move([slots[n] for n in path], len(self.cached))
                self.cached += [tokens[node] for node in path]
        if self.kv is not None:
            self.kv.keep(len(self.cached))

    def _learn(self, result):
        """(this step's proposal, the accepted path in its node numbers) if the verified tree is ours or a subtree
        a controller cut from it (`DraftTree.origin`; not another drafter's, nor one merged by a combining
        drafter), after the calibration has counted its outcome; else None. The cost stop counts every step's
        tokens."""
        if self.cost is not None:
            self.cost.observe(len(result.accepted_nodes))
        proposal, self._proposal = self._proposal, None
        if proposal is None or self.model is None:
            return None
        tokens, parents, _, ranks = proposal
        tree = result.tree  # a tree that kept our host_tokens needs no device read to be recognised
        origin = tree.origin if tree.origin is not None else range(len(tree))
        if len(tree) > len(tokens) or max(origin, default=-1) >= len(tokens):
            return None
        tree_tokens = tree.host_tokens if tree.host_tokens is not None else tree.tokens.tolist()
        mapped_parents = [-1 if parent < 0 else origin[parent] for parent in tree.host_parents]
        if (list(tree_tokens) != [tokens[node] for node in origin]
                or mapped_parents != [parents[node] for node in origin]):
            return None
        if self.calibration is not None:
            self.calibration.observe(list(tree.host_parents), [ranks[node] for node in origin],
                                     result.accepted_nodes)
        return proposal, [origin[node] for node in result.accepted_nodes]

    def _within_window(self, budget: Budget, committed: int) -> Budget | None:
        """`budget` cut to what the draft model's context window still holds after `committed` tokens (the node at
        depth d sits at position committed - 1 + d; a tree step writes up to `width` nodes a depth into the cache),
        or None when not one node fits. A draft model may have a shorter window than the target's."""
        config = getattr(self.model, "config", None)  # any causal LM module works; one without a config: no limit
        window = None if config is None else context_window(config)
        if window is None:
            return budget
        room = window - committed
        depth = min(budget.max_depth, room, 1 + room // self.width) if room > 0 else 0
        return Budget(budget.max_nodes, depth, budget.min_confidence) if depth > 0 else None

    def _load(self, target: TargetView) -> None:
        from transformers import AutoModelForCausalLM

        dtype = getattr(target.model, "dtype", None) or "auto"
        with torch.inference_mode(False):  # weights an online learner may update in place later
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(target.device).eval()
        self._start_learning()

    def _new_kv(self):
        """The draft KV store (`draft_kv`): a DynamicCache, or with graphs=True a GraphBackend's static cache."""
        if self.graphs:
            return GraphKV(self.model, "auto", self.width)
        return DynamicKV(self._forward, next(self.model.parameters()).dtype)

    def _catch_up(self, token_ids: list[int]) -> torch.Tensor:
        """Feed the committed tokens the cache lacks (the root always: its logits score the first level) -> (V,).
        Host work is O(new tokens) but for one list comparison in C (the usual case: the whole cache matches)."""
        keep = max(min(len(self.cached), len(token_ids) - 1), 0)
        if self.cached[:keep] != token_ids[:keep]:
            keep = next(i for i, (ours, theirs) in enumerate(zip(self.cached, token_ids)) if ours != theirs)
        if self.kv is None:
            self.kv = self._new_kv()
        del self.cached[keep:]  # our own list, never the caller's
        self.kv.keep(keep)  # also drops a tree whose observe() never came; keep 0 = a new sequence
        new_ids = [int(token) for token in token_ids[keep:]]
        logits = self.kv.run(new_ids, list(range(keep, len(token_ids))), keep, None, last_only=True)[-1]
        self.cached += new_ids
        return logits

    def _grow(self, root_logits: torch.Tensor, budget: Budget, params: SamplingParams, keep_drafting=None):
        """Candidates, depth by depth (one forward each) -> (all candidates, indices of the `max_nodes` best).

        A node is expanded while it ranks among the best, its cumulative probability is >= budget.min_confidence
        and its own slot probability is >= `self.threshold` (0 here; early_exit's Kangaroo stop sets it); the
        controller's `keep_drafting` (or the cost stop) may end the draft between depths."""
        floor = budget.min_confidence or 0.0
        length = min(budget.max_depth, budget.max_nodes)  # a chain's nodes, when no confidence stop can cut it
        if (self.width == 1 and params.greedy and not floor and self.threshold <= 0.0 and length > 0
                and keep_drafting is None and self.device_chain and isinstance(self.kv, GraphKV)):
            return self._greedy_chain(root_logits, length)
        nodes: list[_Node] = []
        rank_keys: list[tuple[float, int, int]] = []  # (-score, depth, index): best first; ties shallower, older
        frontier, logits, ranked, started = [-1], root_logits[None], [], None
        for depth in range(1, budget.max_depth + 1):
            expansions = self._children(logits, params)  # the host read: the depth's forward has finished
            if started is not None:
                self.cost.depth_ran(time.perf_counter() - started)
            for parent, children in zip(frontier, expansions):
                base = 1.0 if parent < 0 else nodes[parent].score
                for rank, (token, slot_prob, q) in enumerate(children):
                    score = base * (slot_prob if self.calibration is None
                                    else self.calibration.estimate(rank, slot_prob))
                    rank_keys.append((-score, depth, len(nodes)))
                    nodes.append(_Node(token, parent, depth, score, q, rank=rank, prob=slot_prob))
            ranked = [index for _, _, index in sorted(rank_keys)]
            ran, frontier = frontier, [i for i in ranked[: budget.max_nodes - 1] if nodes[i].depth == depth
                        and nodes[i].score >= floor and nodes[i].prob >= self.threshold][: self.width]
            if depth == budget.max_depth or not frontier or not self._pays(nodes, frontier):
                break
            if keep_drafting is not None and not keep_drafting(Frontier(
                    depth, tuple(nodes[i].score for i in frontier), tuple(nodes[i].prob for i in frontier),
                    min(len(nodes), budget.max_nodes), self._frontier_hidden(nodes, frontier, ran))):
                break
            started = None if self.cost is None else time.perf_counter()
            logits = self._run_frontier(nodes, frontier)
        return nodes, ranked[: budget.max_nodes]

    def _pays(self, nodes: list[_Node], frontier: list[int]) -> bool:
        """`cost_stop`: whether the frontier's forward is expected to save more time than it costs (`CostStop`)."""
        if self.cost is None:
            return True
        rate = 1.0 if self.calibration is None else self.calibration.top_rate()
        return self.cost.worth(rate * sum(nodes[node].score for node in frontier))

    def _frontier_hidden(self, nodes: list[_Node], frontier: list[int], ran: list[int]) -> torch.Tensor | None:
        """(F, H) the draft's last hidden state at each frontier node's parent: its row of the forward that drafted
        it (`ran`: that forward's nodes, [-1] = the catch-up's root row); None unless recorded this step."""
        if self._hidden is None:
            return None
        rows = self._hidden[-len(ran):]  # the catch-up's last row is the root's
        row = {node: index for index, node in enumerate(ran)}
        return rows[[row[nodes[node].parent] for node in frontier]]

    def _greedy_chain(self, root_logits: torch.Tensor, length: int) -> tuple[list[_Node], list[int]]:
        """`_grow` for a greedy chain of `length` nodes that no confidence stop cuts, with one device read: the first
        node is the root's top token, the rest come from `GraphKV.greedy_chain` (each draft step's top token the
        next one's input on the device; one CUDA graph replay for the chain). The same nodes and scores as `_grow`
        (whose every depth waited for a device read and a host-built step: ~0.25 ms a depth for a 2-layer draft on
        the H100); every node but the last runs, so the cache holds their rows as `_grow` leaves them."""
        committed = len(self.cached)
        top = root_logits[None].double().softmax(-1).topk(1)  # as `_children`: the same pick on ties
        picks = torch.cat([top.values[0], top.indices[0].double()])[None]
        if length > 1:  # node d runs at position committed - 1 + d, slot committed + d - 1, seeing all before it
            picks = torch.cat([picks, self.kv.greedy_chain(top.indices[0], committed, length - 1)])
        nodes, score = [], 1.0
        for depth, (prob, token) in enumerate(picks.tolist(), start=1):  # ids < 2^53 are exact as float64
            score *= prob
            slot = committed + depth - 1 if depth < length else -1
            nodes.append(_Node(int(token), depth - 2, depth, score, None, slot, prob=prob))
        return nodes, list(range(length))

    def _children(self, logits: torch.Tensor, params: SamplingParams) -> list[list[tuple[int, float, torch.Tensor]]]:
        """(F, V) logits -> per row, up to `width` (token, slot probability, q it was drawn from), best slot first.
        One host read (a device sync on CUDA) when greedy, whatever the width; `_sampled_children` makes two."""
        count = min(self.width, logits.shape[-1])
        if not params.greedy:
            return self._sampled_children(target_probs(logits, params), count)
        top = logits.double().softmax(-1).topk(count)
        read = torch.cat([top.values, top.indices.double()], -1).tolist()  # ids < 2^53: exact as float64
        return [[(int(token), prob, None) for prob, token in zip(row[:count], row[count:]) if prob > 0]
                for row in read]

    def _sampled_children(self, q: torch.Tensor, count: int) -> list[list[tuple[int, float, torch.Tensor]]]:
        """`_children` from (F, V) probabilities q: slot j's token is drawn from q without slots 1..j-1's tokens.
        Two host reads: the slot probabilities (which rows draw which slot), then every slot's tokens at once."""
        slot_probs = q.topk(count).values.tolist()  # (F, count): slot j's probability, per row
        plan = []  # (slot, the rows that draw it: where q has a token left, its slot-th probability > 0)
        for slot in range(count):
            rows = [row for row, probs in enumerate(slot_probs) if probs[slot] > 0]
            if not rows:
                break
            plan.append((slot, rows))
        drawn = []  # per planned slot: its tokens (on the device, read once below) and the q they were drawn from
        for slot, rows in plan:
            every = len(rows) == len(slot_probs)
            tokens = _sample(q if every else q[rows], self._rng)
            drawn.append((tokens, q))
            if slot == len(plan) - 1:
                break
            # the next slot draws without the tokens drawn so far (a new q: the rows handed out stay as drawn from)
            if every:
                q = q.scatter(1, tokens[:, None], 0.0)
                q = q / q.sum(-1, keepdim=True)
            else:
                q = q.clone()
                q[rows, tokens] = 0.0
                q[rows] /= q[rows].sum(-1, keepdim=True)
        read = torch.cat([tokens for tokens, _ in drawn]).tolist() if drawn else []
        children: list[list] = [[] for _ in slot_probs]
        offset = 0
        for (slot, rows), (_, q) in zip(plan, drawn):
            q_rows = q.unbind(0)  # every row's view in one call
            for row, token in zip(rows, read[offset: offset + len(rows)]):
                children[row].append((token, slot_probs[row][slot], q_rows[row]))
            offset += len(rows)
        return children

    def _run_frontier(self, nodes: list[_Node], frontier: list[int]) -> torch.Tensor:
        """One draft forward over the frontier nodes: each sees the committed tokens, its ancestors' KV and itself."""
        past, committed = self.kv.length, len(self.cached)
        block = numpy.zeros((len(frontier), past - committed + len(frontier)), dtype=bool)  # host writes: numpy
        for row, node in enumerate(frontier):
            ancestor = nodes[node].parent
            while ancestor >= 0:
                block[row, nodes[ancestor].slot - committed] = True
                ancestor = nodes[ancestor].parent
            nodes[node].slot = past + row
            block[row, past - committed + row] = True
        positions = [committed - 1 + nodes[node].depth for node in frontier]
        return self.kv.run([nodes[node].token for node in frontier], positions, committed, torch.from_numpy(block))

    def _forward(self, token_ids: list[int], positions: list[int], mask: torch.Tensor | None, cache,
                 last_only: bool = False) -> torch.Tensor:
        """`DynamicKV`'s forward: the draft model over `cache` with a 4D float mask (None: causal) -> (T, V)."""
        device = self.model.device
        keep_last = last_only and "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if self._linear is None or self._linear.model is not self.model:  # the CPU step choices the target's has
            self._linear, self._gqa = LinearKernel(self.model), GQAAttention(self.model)
        with self._linear.active(), self._gqa.active(masked=mask is not None):
            out = self.model(input_ids=torch.tensor([token_ids], device=device),
                             position_ids=torch.tensor([positions], device=device),
                             attention_mask=None if mask is None else mask.to(device),
                             use_cache=True, **{cache_keyword(self.model.forward): cache},
                             **({"logits_to_keep": 1} if keep_last else {}),
                             **({"output_hidden_states": True} if self._record_hidden else {}))
        if self._record_hidden:  # the rows that made the logits (all of them but for a kept last one)
            self._hidden = out.hidden_states[-1][0, -out.logits.shape[1]:]
        return out.logits[0]


def _sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of (R, V) `probs` (each row with mass > 0) -> (R,). An exponential race: argmax p / E,
    E ~ Exp(1) i.i.d., is token i with probability p_i. It is torch.multinomial(probs, 1)'s own algorithm (the same
    draws from `generator`, the same tokens), without its validity checks, which read the device twice."""
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1)
