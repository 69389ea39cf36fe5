"""Tree verification's attention on a CPU without copying the KV cache for grouped-query attention.

transformers' `sdpa` attention hands SDPA its grouped keys and values only when no mask is given; with one (a tree's
ancestor mask) it first copies every layer's cached keys and values once per query head of a group (`repeat_kv`).
On SmolLM2-135M (9 heads, 3 KV heads) at a 1,500-token context that copy took 44 ms of a 170 ms verify of 4 nodes
on this project's 2-core CPU, against 66 ms for a plain step, which needs no mask and copies nothing. Torch's CPU
SDPA takes a mask and `enable_gqa` together and gives the same numbers (the heads are only indexed, not summed
differently), so `specdec_gqa_sdpa` passes the grouped tensors with the mask and leaves every other case to
transformers' own `sdpa` function.

`GQAAttention(model).active(masked)` switches the model to it for one masked forward and back after (the model's
own setting is what everything else sees); a model without grouped heads, off a CPU, or not on `sdpa` is left alone.
"""

from __future__ import annotations

import contextlib
import functools

import torch

NAME = "specdec_gqa_sdpa"


def gqa_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention-function contract: (B, H, Q, D) query, (B, Hkv, K, D) key and value -> ((B, Q, H, D)
    output, None). Grouped heads with a mask on a CPU go to SDPA whole; the rest to transformers' `sdpa`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain_kwargs = kwargs.get("softcap") is None and kwargs.get("position_bias") is None
    if grouped and attention_mask is not None and query.device.type == "cpu" and plain_kwargs:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)


@functools.cache
def register() -> str:
    """Register `gqa_sdpa_forward` with transformers (and the `sdpa` mask builder under its name); once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


class GQAAttention:
    """Whether a model's masked forwards use `specdec_gqa_sdpa` (`enabled`), and the switch around one."""

    def __init__(self, model):
        config = getattr(model, "config", None)  # any causal LM module may draft; one without a config is left alone
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        parameter = next(model.parameters(), None)
        self.model = model
        self.enabled = (parameter is not None and parameter.device.type == "cpu" and heads is not None
                        and kv_heads < heads and getattr(model.config, "_attn_implementation", None) == "sdpa"
                        and hasattr(model, "set_attn_implementation"))
        self._configs = []  # the configs the model's attention reads (a causal LM and its inner model share one)
        if self.enabled:
            try:  # a model that refuses a registered implementation (or ignores it, warning) keeps its own
                model.set_attn_implementation(register())
                switched = model.config._attn_implementation == NAME
                self._configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")
                                      and getattr(m.config, "_attn_implementation", None) == NAME}.values())
                model.set_attn_implementation("sdpa")
            except (ValueError, TypeError, NotImplementedError, AttributeError):
                switched = False
            self.enabled = switched

    @contextlib.contextmanager
    def active(self, masked: bool = True):
        """Switch the configs directly: `set_attn_implementation` (checked once above) walks every module, ~0.4 ms
        a call, twice per verify."""
        if not (self.enabled and masked):
            yield
            return
        for config in self._configs:
            config._attn_implementation_internal = NAME
        try:
            yield
        finally:
            for config in self._configs:
                config._attn_implementation_internal = "sdpa"
