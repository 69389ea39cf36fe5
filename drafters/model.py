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
node is the j-th largest probability of the draft's distribution there. The final tree is the `max_nodes` best
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
from dataclasses import dataclass

import torch
from specdec.controllers.base import Budget
from specdec.drafters.base import DraftContext, TargetView, register_drafter
from specdec.drafters.draft_kv import DynamicKV, GraphKV
from specdec.sampling import SamplingParams, target_probs
from specdec.tree import DraftTree

_SEED_SALT = 0x5DEECE66D  # the draft sampler's stream must not replay the acceptance generator's (same seed)


@dataclass
class _Node:
    token: int
    parent: int                  # candidate index, -1 = the root
    depth: int
    score: float                 # product of slot probabilities along the path
    q: torch.Tensor | None       # (V,) the distribution the token was drawn from; None = deterministic top-k
    slot: int = -1               # cache row of its KV once it ran as frontier, -1 = never ran


@register_drafter("model")
class ModelDrafter:
    """model: a `PreTrainedModel`, or a local path / model id loaded at first use onto the target's device in the
    target's dtype (`path=` says the same in spec strings: "model:path=/dir/of/draft,mode=chain").
    mode: "tree" (dynamic tree) or "chain". topk: children per expanded node and nodes expanded per depth.
    graphs: keep the draft KV in a static cache and run every draft forward as a CUDA graph (`GraphBackend`; the
    same code runs eagerly off CUDA) instead of HF's eager forward over a DynamicCache."""

    threshold = 0.0  # expand a node only while its own slot probability reaches this (early_exit raises it)

    def __init__(self, model=None, path: str | None = None, mode: str = "tree", topk: int = 4, graphs: bool = False):
        if mode not in ("tree", "chain"):
            raise ValueError(f"mode must be 'tree' or 'chain', got {mode!r}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        source = path if model is None else model
        if source is None:
            raise ValueError("the model drafter needs a draft model: pass model=<PreTrainedModel> or path=<dir>")
        if isinstance(source, (str, os.PathLike)):
            from transformers import AutoConfig

            self.model, self.path = None, str(source)
            self.vocab_size = AutoConfig.from_pretrained(self.path).vocab_size
        else:
            self.model, self.path = source.eval(), None
            self.vocab_size = source.get_output_embeddings().weight.shape[0]
        self.width = 1 if mode == "chain" else topk
        self.graphs, self.kv = bool(graphs), None
        self.reset()

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.keep(0)
        self.cached: list[int] = []   # the committed tokens whose KV `kv` holds (its first rows)
        self._proposal: tuple[list[int], list[int], list[int]] | None = None  # tokens, parents, cache rows
        self._rng: torch.Generator | None = None

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        if self.model is None:
            self._load(ctx.target)
        if self._rng is None:  # a new sequence
            self._rng = torch.Generator(self.model.device)
            self._rng.seed() if ctx.params.seed is None else self._rng.manual_seed(ctx.params.seed ^ _SEED_SALT)
        try:
            root_logits = self._catch_up([int(token) for token in ctx.token_ids])
            nodes, kept = self._grow(root_logits, ctx.budget, ctx.params)
        except Exception:
            self.cached = []  # a forward that failed part-way leaves layers uneven: the next propose starts anew
            if self.kv is not None:
                self.kv.keep(0)
            raise
        order = sorted(kept, key=lambda i: (nodes[i].depth, i))  # topological, siblings in slot order
        index = {node: new for new, node in enumerate(order)}
        tokens = [nodes[i].token for i in order]
        parents = [-1 if nodes[i].parent < 0 else index[nodes[i].parent] for i in order]
        self._proposal = (tokens, parents, [nodes[i].slot for i in order])
        probs = None if ctx.params.greedy or not order else torch.stack([nodes[i].q for i in order])
        device = self.model.device
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                         torch.tensor(parents, dtype=torch.long, device=device), probs, ("model",) * len(order),
                         host_parents=tuple(parents))

    @torch.inference_mode()
    def observe(self, result) -> None:
        """Move the accepted path's tree KV (where it ran) behind the committed tokens; drop the rest."""
        proposal, self._proposal = self._proposal, None
        if proposal is not None and self.model is not None:
            tokens, parents, slots = proposal
            if result.tree.tokens.tolist() == tokens and list(result.tree.host_parents) == parents:
                path = list(itertools.takewhile(lambda node: slots[node] >= 0, result.accepted_nodes))
                if path:
                    self.kv.move([slots[n] for n in path], len(self.cached))
                    self.cached += [tokens[node] for node in path]
        if self.kv is not None:
            self.kv.keep(len(self.cached))

    def _load(self, target: TargetView) -> None:
        from transformers import AutoModelForCausalLM

        dtype = getattr(target.model, "dtype", None) or "auto"
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(target.device).eval()

    def _new_kv(self):
        """The draft KV store (`draft_kv`): a DynamicCache, or with graphs=True a GraphBackend's static cache."""
        if self.graphs:
            return GraphKV(self.model, "auto", self.width)
        return DynamicKV(self._forward, next(self.model.parameters()).dtype)

    def _catch_up(self, token_ids: list[int]) -> torch.Tensor:
        """Feed the committed tokens the cache lacks (the root always: its logits score the first level) -> (V,)."""
        keep = 0
        while keep < min(len(self.cached), len(token_ids) - 1) and self.cached[keep] == token_ids[keep]:
            keep += 1
        if self.kv is None:
            self.kv = self._new_kv()
        self.cached = self.cached[:keep]
        self.kv.keep(keep)  # also drops a tree whose observe() never came; keep 0 = a new sequence
        logits = self.kv.run(token_ids[keep:], list(range(keep, len(token_ids))), keep, None, last_only=True)[-1]
        self.cached = token_ids
        return logits

    def _grow(self, root_logits: torch.Tensor, budget: Budget, params: SamplingParams):
        """Candidates, depth by depth (one forward each) -> (all candidates, indices of the `max_nodes` best).

        A node is expanded while it ranks among the best, its cumulative probability is >= budget.min_confidence
        and its own slot probability is >= `self.threshold` (0 here; early_exit's Kangaroo stop sets it)."""
        nodes: list[_Node] = []
        own: list[float] = []  # slot probability of each candidate (its score over its parent's)
        frontier, logits, ranked = [-1], root_logits[None], []
        floor = budget.min_confidence or 0.0
        for depth in range(1, budget.max_depth + 1):
            for parent, children in zip(frontier, self._children(logits, params)):
                base = 1.0 if parent < 0 else nodes[parent].score
                nodes += [_Node(token, parent, depth, base * slot_prob, q) for token, slot_prob, q in children]
                own += [slot_prob for _, slot_prob, _ in children]
            ranked = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth, i))
            frontier = [i for i in ranked[: budget.max_nodes - 1] if nodes[i].depth == depth
                        and nodes[i].score >= floor and own[i] >= self.threshold][: self.width]
            if depth == budget.max_depth or not frontier:
                break
            logits = self._run_frontier(nodes, frontier)
        return nodes, ranked[: budget.max_nodes]

    def _children(self, logits: torch.Tensor, params: SamplingParams) -> list[list[tuple[int, float, torch.Tensor]]]:
        """(F, V) logits -> per row, up to `width` (token, slot probability, q it was drawn from), best slot first."""
        if params.greedy:
            top = logits.double().softmax(-1).topk(min(self.width, logits.shape[-1]))
            return [[(token, prob, None) for token, prob in zip(tokens, probs) if prob > 0]
                    for tokens, probs in zip(top.indices.tolist(), top.values.tolist())]
        q = target_probs(logits, params)
        slot_probs = q.sort(-1, descending=True).values[:, : self.width].tolist()
        children: list[list] = [[] for _ in slot_probs]
        for slot in range(len(slot_probs[0])):
            rows = [row for row, probs in enumerate(slot_probs) if probs[slot] > 0]  # q has a token left
            if not rows:
                break
            tokens = torch.multinomial(q[rows], 1, generator=self._rng)[:, 0]
            for row, token in zip(rows, tokens.tolist()):
                children[row].append((token, slot_probs[row][slot], q[row]))
            q = q.clone()  # the rows handed out above stay as they were drawn from
            q[rows, tokens] = 0.0
            q[rows] /= q[rows].sum(-1, keepdim=True)
        return children

    def _run_frontier(self, nodes: list[_Node], frontier: list[int]) -> torch.Tensor:
        """One draft forward over the frontier nodes: each sees the committed tokens, its ancestors' KV and itself."""
        past, committed = self.kv.length, len(self.cached)
        block = torch.zeros(len(frontier), past - committed + len(frontier), dtype=torch.bool)
        for row, node in enumerate(frontier):
            ancestor = nodes[node].parent
            while ancestor >= 0:
                block[row, nodes[ancestor].slot - committed] = True
                ancestor = nodes[ancestor].parent
            nodes[node].slot = past + row
            block[row, past - committed + row] = True
        positions = [committed - 1 + nodes[node].depth for node in frontier]
        return self.kv.run([nodes[node].token for node in frontier], positions, committed, block)

    def _forward(self, token_ids: list[int], positions: list[int], mask: torch.Tensor | None, cache,
                 last_only: bool = False) -> torch.Tensor:
        """`DynamicKV`'s forward: the draft model over `cache` with a 4D float mask (None: causal) -> (T, V)."""
        device = self.model.device
        keep_last = last_only and "logits_to_keep" in inspect.signature(self.model.forward).parameters
        out = self.model(input_ids=torch.tensor([token_ids], device=device),
                         position_ids=torch.tensor([positions], device=device),
                         attention_mask=None if mask is None else mask.to(device),
                         past_key_values=cache, use_cache=True, **({"logits_to_keep": 1} if keep_last else {}))
        return out.logits[0]
