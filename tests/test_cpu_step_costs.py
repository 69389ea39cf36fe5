"""What makes the HF backend's CPU steps cheaper without changing a number: the cache that appends in place
(`growing_cache`) and grouped-query attention under a tree mask (`gqa_attention`)."""

import pytest
import torch
from transformers import DynamicCache

from specdec.backends.gqa_attention import NAME, GQAAttention, gqa_sdpa_forward
from specdec.backends.growing_cache import HEADROOM, GrowingCache
from specdec.backends.hf import HFBackend
from specdec.tree import DraftTree
from tiny_models import VOCAB, fresh_tiny_model, repetitive_prompt, single_thread, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def rows(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 2, count, 4, generator=generator, dtype=torch.float64),
            torch.randn(1, 2, count, 4, generator=generator, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- growing cache


def test_growing_cache_holds_what_hfs_cache_holds_through_appends_crops_and_growth():
    ours, theirs = GrowingCache(), DynamicCache()
    steps = [(300, 0), (1, 0), (5, -3), (1, -1), (400, 0), (7, -7), (2, 0)]  # the second 400 outgrows the buffer
    for seed, (count, crop) in enumerate(steps):
        keys, values = rows(count, seed)
        for layer in range(2):
            got = ours.update(keys + layer, values - layer, layer)
            want = theirs.update(keys + layer, values - layer, layer)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        ours.crop(crop)
        theirs.crop(crop)
        assert ours.get_seq_length() == theirs.get_seq_length()
        for a, b in zip(ours.layers, theirs.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert ours.layers[0].key_buffer.shape[-2] >= ours.get_seq_length()


def test_growing_cache_writes_in_place_and_doubles_when_full():
    cache = GrowingCache()
    cache.update(*rows(10, 0), 0)
    layer = cache.layers[0]
    buffer = layer.key_buffer
    assert buffer.shape[-2] == 10 + HEADROOM and layer.keys.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    cache.update(*rows(HEADROOM, 1), 0)  # exactly full: no new buffer
    assert layer.key_buffer is buffer
    cache.update(*rows(1, 2), 0)
    assert layer.key_buffer is not buffer and layer.key_buffer.shape[-2] == 2 * buffer.shape[-2]


def test_a_view_handed_out_earlier_keeps_its_rows():
    cache = GrowingCache()
    keys, values = rows(20, 0)
    cache.update(keys, values, 0)
    early = cache.layers[0].keys[..., :20, :]
    cache.crop(-5)                      # rows 15..19 dropped, then written over by the next update
    cache.update(*rows(3, 1), 0)
    cache.update(*rows(HEADROOM * 2, 2), 0)  # grows: a new buffer
    assert torch.equal(early[..., :15, :], keys[..., :15, :])


def test_a_layer_whose_tensors_were_replaced_copies_them_into_a_new_buffer():
    cache = GrowingCache()
    cache.update(*rows(6, 0), 0)
    layer = cache.layers[0]
    layer.batch_repeat_interleave(2)    # HF's batch methods put new tensors in place of the views
    expected = layer.keys.clone()
    new_keys, new_values = torch.cat([rows(1, 1)[0]] * 2), torch.cat([rows(1, 1)[1]] * 2)
    keys, _ = cache.update(new_keys, new_values, 0)
    assert keys.shape == (2, 2, 7, 4) and torch.equal(keys[..., :6, :], expected)


def test_backend_steps_over_the_growing_cache_match_a_fresh_prefill():
    model = tiny_model("llama")
    backend = HFBackend(model)
    prompt = repetitive_prompt(VOCAB, seed=2, length=30)
    state = backend.prefill(prompt[:-1])
    assert isinstance(state.cache, GrowingCache)
    tree = DraftTree(torch.tensor([4, 5, 6, 7]), torch.tensor([-1, 0, -1, 2]))
    backend.score_tree(state, prompt[-1], tree)
    backend.commit(state, [2, 3], len(tree))  # a path that moves rows: nodes 2 and 3 behind the root
    logits = backend.decode(state, 11)
    fresh = backend.prefill(prompt + [6, 7])
    torch.testing.assert_close(logits, backend.decode(fresh, 11), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- GQA attention


def attention_inputs(queries: int = 5, past: int = 40):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, queries, 8, generator=generator)
    key = torch.randn(1, 2, past + queries, 8, generator=generator)
    value = torch.randn(1, 2, past + queries, 8, generator=generator)
    mask = torch.zeros(1, 1, queries, past + queries)
    mask[..., past:] = torch.triu(torch.full((queries, queries), torch.finfo(torch.float32).min), 1)
    return query, key, value, mask


class _Grouped(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_gqa_attention_with_a_mask_equals_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Grouped()
    query, key, value, mask = attention_inputs()
    ours, _ = gqa_sdpa_forward(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)  # repeat_kv, then SDPA
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert ours.shape == (1, 5, 4, 8) and ours.is_contiguous()


def test_the_gqa_switch_is_scoped_to_masked_forwards():
    model = fresh_tiny_model("llama")  # 4 heads over 2 KV heads, sdpa, CPU
    gqa = GQAAttention(model)
    assert gqa.enabled and model.config._attn_implementation == "sdpa"
    with gqa.active(masked=False):
        assert model.config._attn_implementation == "sdpa"
    with gqa.active(masked=True):
        assert model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with gqa.active():
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_models_without_grouped_heads_or_sdpa_are_left_alone():
    assert not GQAAttention(tiny_model("gpt2")).enabled  # one KV head per query head
    eager = fresh_tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert not GQAAttention(eager).enabled


def test_a_model_that_refuses_or_ignores_the_switch_keeps_its_own_attention(monkeypatch):
    refusing = fresh_tiny_model("llama")
    monkeypatch.setattr(refusing, "set_attn_implementation", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert not GQAAttention(refusing).enabled
    ignoring = fresh_tiny_model("llama")
    monkeypatch.setattr(ignoring, "set_attn_implementation", lambda name: None)  # as transformers does, warning
    assert not GQAAttention(ignoring).enabled


def test_masked_forwards_run_through_the_gqa_function(monkeypatch):
    import specdec.backends.gqa_attention as gqa_module

    calls = []
    original = gqa_module.gqa_sdpa_forward
    monkeypatch.setattr(gqa_module, "gqa_sdpa_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, gqa_module.gqa_sdpa_forward)
    try:
        backend = HFBackend(fresh_tiny_model("llama"))
        state = backend.prefill(repetitive_prompt(VOCAB, seed=4))
        backend.decode(state, 3)
        assert not calls  # a plain step: no mask, the model's own sdpa
        backend.score_tree(state, 3, DraftTree.chain([4, 5]))
        assert len(calls) == 2  # one per layer
    finally:
        AttentionInterface.register(NAME, original)
