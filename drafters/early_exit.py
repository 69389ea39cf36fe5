"""`early_exit`: self-speculative drafting from the target's own first L layers + a trained exit head (Kangaroo,
LayerSkip). draft_logits = lm_head(norm(head(h_L))): the target's final norm and LM head are shared, not copied.

**Cache.** Where the target's backend offers its cached layers (`DraftContext.prefix_kv`: the `hf`, `static` backends)
the draft reads the target's own keys and values of layers < L for every committed token, as Kangaroo does: no cache
of its own, and no draft pass over committed tokens (the target's verify pass has already computed their layers
< L). Each step it runs only the root and its frontier nodes through those layers, appending to a copy-on-append
view of the target's KV (HF's `DynamicCache` copies on append; the target's tensors are never written), and drops
the view after `observe`. With `share_kv=False`, or with `graphs=True` (the L layers captured as CUDA graphs over a
static cache, `draft_kv.GraphKV`; on CUDA through `NativeLlama`'s forward of those layers, `native`), it keeps a
cache of its own with `ModelDrafter`'s bookkeeping (subclassed): the committed tokens it has consumed, each step
feeds what the context added, grows the draft one depth per forward with tree attention, and `observe` keeps the
accepted path's KV and crops the rest (L/num_layers of the target's cache).

**Stopping (Kangaroo's double early exit).** A node is expanded only while its own slot probability (the draft's
top probability at its parent for a chain) is >= `threshold`; a node below it stays in the draft as a leaf. So
threshold 1.0 drafts one token per step, threshold 0 drafts to the budget's max_depth. `budget.min_confidence`
(on the path's cumulative probability) and the node budget apply as in `ModelDrafter`.

**Modes.** "chain" (default): one token per depth. "tree": best-first top-k expansion as `ModelDrafter`'s dynamic
tree. At temperature > 0 drafts are sampled and carry their q (`draft_probs`) under the same rules.

    drafter = EarlyExitDrafter(head="head.safetensors", threshold=0.6)     # spec: "early_exit:head=head.safetensors"
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types

import torch
from transformers.masking_utils import create_causal_mask

from specdec.backends.hf import cache_keyword
from specdec.drafters.base import DraftContext, TargetView, register_drafter
from specdec.drafters.draft_kv import DynamicKV, GraphKV
from specdec.drafters.model import ModelDrafter
from specdec.train.early_exit import ExitHead, ExitHeadConfig, draft_logits
from specdec.tree import DraftTree

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder layers called as LlamaModel calls them


@register_drafter("early_exit")
class EarlyExitDrafter(ModelDrafter):
    """head: an `ExitHead` or the path of a saved one; or none and `layer`: an untrained head (the identity: a plain
    early exit at that layer, `head_kind` "linear" or "mlp"), for a drafter that learns online from nothing.
    threshold: expand a node only while its slot probability is at least this. mode: "chain" or "tree"; topk:
    children per expanded node in tree mode; calibrate: tree scores from learnt acceptance rates; cost_stop: stop a
    depth that costs more than it saves; online, online_*: learn online (all as `ModelDrafter`)."""

    def __init__(self, head: ExitHead | str | os.PathLike | None = None, threshold: float = 0.6, mode: str = "chain",
                 topk: int = 4, graphs: bool = False, share_kv: bool = True, native: bool | None = None,
                 calibrate: bool = True, cost_stop: bool = False, online: bool = False, online_lr: float = 1e-3,
                 online_every: int = 2048, online_loss: str = "fkl", online_epochs: int = 1,
                 online_background: bool = False, online_checkpoint: str | None = None, layer: int | None = None,
                 head_kind: str = "linear"):
        self._set_drafting(mode, topk, calibrate, cost_stop)
        self._set_online(online, lr=online_lr, every=online_every, loss=online_loss, epochs=online_epochs,
                         background=online_background, checkpoint=online_checkpoint)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if head is None and (not isinstance(layer, int) or layer < 1):
            raise ValueError(f"the early_exit drafter needs an exit head: head=<file> (specdec train early-exit), or "
                             f"layer=<L >= 1> for an untrained one (to learn online), got layer={layer!r}")
        self.head = None if head is None else head if isinstance(head, ExitHead) else ExitHead.load(head)
        self.head_kind, self.threshold = head_kind, float(threshold)
        self.layer = layer if self.head is None else self.head.config.layer
        self.vocab_size = None if self.head is None else self.head.config.vocab_size  # untrained: the target's
        self.model, self.path = None, None  # the target, bound at the first propose
        self.graphs, self.kv = bool(graphs), None  # graphs: the L layers' KV in a static cache (`draft_kv`)
        self.native = native  # graphs: the L layers through `NativeLlama` (None: where it can run, on CUDA)
        self.share_kv, self._shared = bool(share_kv), False  # _shared: this step's cache is the target's view
        self.reset()

    def batch_proposer(self, batch_size: int, max_len: int, target, native=False):
        """None: its draft is the target's own first layers, run per row (no batched draft cache of its own)."""
        return None

    def propose(self, ctx: DraftContext) -> DraftTree:
        if ctx.target.model is not self.model:
            self._load(ctx.target)
        self._shared = self.share_kv and not self.graphs and ctx.prefix_kv is not None
        if self._shared:
            self._adopt_target_kv(ctx)
        tree = super().propose(ctx)
        return dataclasses.replace(tree, source=("early_exit",) * len(tree))

    def bind(self, target: TargetView) -> None:
        """Bind the target now (its layers, the head's checks, the learner) instead of at the first `propose`."""
        if target.model is not self.model:
            self._load(target)

    def observe(self, result) -> None:
        if self._shared:  # the target's cache now holds the accepted tokens: nothing of ours to keep
            self._teach(result, self._learn(result))
            self.kv, self.cached, self._shared = None, [], False
            return
        super().observe(result)

    def _adopt_target_kv(self, ctx: DraftContext) -> None:
        """This step's draft cache: the target's KV of layers < L for token_ids[:-1] (so the catch-up runs only the
        root), appended to copy-on-append."""
        kv = DynamicKV(self._forward, next(self.model.parameters()).dtype)
        for index, (keys, values) in enumerate(ctx.prefix_kv(self.layer)):
            kv.cache.update(keys, values, index)
        self.kv, self.cached = kv, list(ctx.token_ids[:-1])

    def _load(self, target: TargetView) -> None:
        """Bind the target: check it is supported and matches the head; move the head to its device and dtype."""
        model = target.model
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"the early_exit drafter runs the decoder layers of {', '.join(SUPPORTED_MODEL_TYPES)} "
                             f"models; the target is {model_type!r}")
        if self.head is None:
            self.head = ExitHead(ExitHeadConfig.for_target(model, self.layer, self.head_kind))
        self.head.config.check_target(model)
        self.head = self.head.to(model.device, next(model.parameters()).dtype).eval()
        self.model, self.kv = model, None
        self._start_learning()
        self.reset()

    def _start_learning(self) -> None:
        from specdec.train.online import HeadStudent, OnlineLearner

        if self.online_config is not None and self.learner is None:  # the head learns; the target's layers do not
            with torch.inference_mode(False):
                self.learner = OnlineLearner(HeadStudent(self), self.online_config)

    def _forward(self, token_ids: list[int], positions: list[int], mask: torch.Tensor | None, cache,
                 last_only: bool = False) -> torch.Tensor:
        """The first L layers over `token_ids` (appending their KV to `cache`), the head, norm, LM head -> (T, V)."""
        device = self.model.device
        return self.run_layers(torch.tensor([token_ids], device=device), torch.tensor([positions], device=device),
                               None if mask is None else mask.to(device), cache, last_only)[0]

    def run_layers(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, cache,
                   last_only: bool = False) -> torch.Tensor:
        """(1, T) ids -> (1, T, V) draft logits through the first L layers over `cache` (any HF `Cache`)."""
        hidden = self.hidden_after(input_ids, position_ids, mask, cache)
        if last_only:
            hidden = hidden[:, -1:]
        return draft_logits(self.model, self.head, hidden)

    def hidden_after(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                     cache) -> torch.Tensor:
        """(1, T) ids -> (1, T, H) h_L: the target's first L layers over `cache` (appending their KV to it)."""
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        attention = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask,
                                       position_ids=position_ids, **{cache_keyword(create_causal_mask): cache})
        rotary = inner.rotary_emb(hidden, position_ids)
        layer_cache = {cache_keyword(inner.layers[0].forward): cache}
        for decoder_layer in inner.layers[: self.layer]:
            hidden = decoder_layer(hidden, attention_mask=attention, position_embeddings=rotary,
                                   position_ids=position_ids, use_cache=True, **layer_cache)
        return hidden

    def _new_kv(self):
        if self.graphs:  # an L-layer static cache; native: specdec's forward of those layers, then the exit head
            return GraphKV(_EarlyLayers(self), None, self.width, native=self.native)
        return super()._new_kv()


class _EarlyLayers(torch.nn.Module):
    """The target's first L layers + the exit head, shaped like a causal LM for `GraphBackend` (whose static cache
    then holds those L layers only): forward(input_ids, position_ids, attention_mask, past_key_values) -> .logits;
    and for `NativeBackend`: `model` (the body cut to L layers) and `exit_head`."""

    def __init__(self, drafter: EarlyExitDrafter):
        super().__init__()
        self.target, self.run_layers, self.exit_head = drafter.model, drafter.run_layers, drafter.head
        self.config = copy.copy(drafter.model.config)
        self.config.num_hidden_layers = drafter.layer

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def model(self) -> types.SimpleNamespace:
        """The decoder body `NativeLlama` reads: the target's, cut to its first L layers."""
        inner = self.target.model
        return types.SimpleNamespace(layers=inner.layers[: self.config.num_hidden_layers], norm=inner.norm,
                                     embed_tokens=inner.embed_tokens, rotary_emb=inner.rotary_emb)

    def get_output_embeddings(self):
        return self.target.get_output_embeddings()

    def forward(self, input_ids, position_ids, attention_mask=None, past_key_values=None, **kwargs):
        return types.SimpleNamespace(logits=self.run_layers(input_ids, position_ids, attention_mask,
                                                            past_key_values))

