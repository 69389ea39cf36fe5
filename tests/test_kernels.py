"""Kernels under TRITON_INTERPRET=1 (conftest), flash-attention style: a float64 reference, tolerance = 2x the error
of the same computation in the input dtype plus a small floor, odd sizes (P = 97, 1025; head dims 59, 80), and a
rerun for bitwise determinism. Then the registered attention function inside a tiny HF Llama, and KV compaction."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")

import transformers  # noqa: E402

from specdec.backends.hf import HFBackend  # noqa: E402
from specdec.generator import SpeculativeGenerator  # noqa: E402
from specdec.kernels import tree_attention as tree_attention_module  # noqa: E402
from specdec.kernels.kv_compact import kv_compact, kv_compact_reference  # noqa: E402
from specdec.kernels.tree_attention import (register_tree_attention, tree_attention,  # noqa: E402
                                            tree_attention_forward, tree_attention_reference)
from specdec.reference import reference_decode  # noqa: E402
from specdec.sampling import SamplingParams  # noqa: E402
from specdec.stopping import StopRule  # noqa: E402
from specdec.tree import DraftTree, ancestor_mask  # noqa: E402
from tiny_models import repetitive_prompt  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def random_tree(num_nodes: int, generator: torch.Generator) -> DraftTree:
    parents = [int(torch.randint(-1, i, (), generator=generator)) for i in range(num_nodes)]
    return DraftTree(torch.zeros(num_nodes, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def tree_block(tree: DraftTree) -> torch.Tensor:
    """(N+1, N+1) bool: row 0 (the root) sees column 0 only; node i sees the root, its ancestors and itself."""
    n = len(tree)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = ancestor_mask(tree)
    return mask


def make_inputs(batch, kv_heads, group, tree_size, prefix_len, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, tree_size, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(batch, kv_heads, prefix_len + tree_size, head_dim, generator=generator).to(dtype)
            for _ in range(2))
    return q, k, v, tree_block(random_tree(tree_size - 1, generator))


def assert_close_to_reference(out, q, k, v, prefix_len, mask, scale=None):
    exact = tree_attention_reference(q, k, v, prefix_len, mask, scale, dtype=torch.float64)
    same_dtype = tree_attention_reference(q, k, v, prefix_len, mask, scale, dtype=q.dtype)
    baseline = (same_dtype.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert error <= 2 * baseline + FLOOR[q.dtype], f"kernel error {error:.3g} vs torch {q.dtype} {baseline:.3g}"


# (batch, kv heads, GQA group, T, P, head dim, dtype): every T, P, group, dtype and head dim, not their product.
CASES = [
    (1, 2, 1, 1, 0, 64, torch.float32),
    (2, 1, 8, 1, 97, 128, torch.float16),
    (1, 2, 4, 1, 1025, 64, torch.bfloat16),   # auto split-KV: 2 programs, 1025 keys -> 16 splits of 64 keys
    (1, 2, 4, 3, 0, 128, torch.bfloat16),
    (1, 1, 8, 3, 1, 80, torch.float32),
    (2, 2, 1, 3, 97, 64, torch.float16),
    (1, 1, 8, 63, 0, 64, torch.float16),       # 504 rows: two row tiles
    (1, 1, 4, 63, 1, 128, torch.float32),
    (1, 2, 1, 63, 97, 80, torch.bfloat16),
    (1, 1, 4, 3, 1025, 59, torch.float32),
]


@pytest.mark.parametrize("batch,kv_heads,group,tree_size,prefix_len,head_dim,dtype", CASES)
def test_tree_attention_matches_reference(batch, kv_heads, group, tree_size, prefix_len, head_dim, dtype):
    q, k, v, mask = make_inputs(batch, kv_heads, group, tree_size, prefix_len, head_dim, dtype)
    assert_close_to_reference(tree_attention(q, k, v, mask), q, k, v, prefix_len, mask)


# 37 splits of 128 keys (the interpreter's block): more than a power of two holds, more than 32
@pytest.mark.parametrize("num_splits, tree_size, prefix_len", [(3, 63, 1025), (37, 1, 4700)])
def test_split_kv_matches_reference_and_is_deterministic(num_splits, tree_size, prefix_len):
    q, k, v, mask = make_inputs(1, 1, 4, tree_size, prefix_len, 64, torch.float16, seed=1)
    split = tree_attention(q, k, v, mask, scale=0.2, num_splits=num_splits)
    assert_close_to_reference(split, q, k, v, prefix_len, mask, scale=0.2)
    assert torch.equal(split, tree_attention(q, k, v, mask, scale=0.2, num_splits=num_splits))  # bitwise rerun
    assert (split.double() - tree_attention(q, k, v, mask, scale=0.2, num_splits=1).double()).abs().max() < 2e-3


def test_per_row_prefixes_and_masks_equal_each_row_alone():
    """Batched decoding: each batch row reads its own prefix length (a (B,) device tensor) and its own (T, W) tree
    mask from the (B, T, W) stack; its tree block sits right behind its prefix and the keys past it are stale
    (NaN here: never read). With a fixed split size a row's result is bitwise the same as that row run alone, and
    the same whatever its neighbours' lengths."""
    generator = torch.Generator().manual_seed(5)
    prefixes, tree_size, capacity = [0, 97, 300, 5], 4, 320
    q = torch.randn(len(prefixes), 4, tree_size, 32, generator=generator)
    k, v = (torch.randn(len(prefixes), 2, capacity, 32, generator=generator) for _ in range(2))
    masks = torch.stack([tree_block(random_tree(tree_size - 1, generator)) for _ in prefixes])
    for row, prefix in enumerate(prefixes):
        k[row, :, prefix + tree_size:] = float("nan")
        v[row, :, prefix + tree_size:] = float("nan")
    lengths = torch.tensor(prefixes)
    out = tree_attention(q, k, v, masks, prefix_len=lengths, split_keys=128)
    for row, prefix in enumerate(prefixes):
        one = slice(row, row + 1)
        alone = tree_attention(q[one], k[one], v[one], masks[row], prefix_len=lengths[one], split_keys=128)
        assert torch.equal(out[one], alone)
        assert_close_to_reference(out[one], q[one], k[one], v[one], prefix, masks[row])
    shuffled = [3, 1, 0, 2]  # permuted rows: the same per-row numbers
    assert torch.equal(tree_attention(q[shuffled], k[shuffled], v[shuffled], masks[shuffled],
                                      prefix_len=lengths[shuffled], split_keys=128), out[shuffled])
    with pytest.raises(ValueError, match="per-row tree_mask"):
        tree_attention(q, k, v, masks[:2], prefix_len=lengths, split_keys=128)
    with pytest.raises(ValueError, match="prefix_len must be"):
        tree_attention(q, k, v, masks, prefix_len=lengths[:2], split_keys=128)


def test_non_contiguous_inputs_and_static_cache_tail():
    """Strided q/k/v; keys past P + T (a static cache's unused tail) are ignored, with P given as a device tensor
    and the tree block read from full-width mask rows (the rows of an HF 4D mask)."""
    prefix_len, tree_size, capacity = 97, 3, 140
    q, k, v, mask = make_inputs(1, 2, 4, tree_size, capacity - tree_size, 64, torch.float32, seed=2)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_strided, v_strided = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (k, v))
    full_rows = torch.zeros(tree_size, capacity, dtype=torch.bool)
    full_rows[:, :prefix_len] = True
    full_rows[:, prefix_len: prefix_len + tree_size] = mask
    out = tree_attention(q_strided, k_strided, v_strided, full_rows, prefix_len=torch.tensor(prefix_len))
    assert_close_to_reference(out, q, k, v, prefix_len, mask)


# --------------------------------------------------------------------------------- transformers integration

GREEDY = SamplingParams(temperature=0.0)


def tiny_llama() -> transformers.PreTrainedModel:
    """Random-init float32 Llama with GQA 4 (8 query heads, 2 kv heads); logits spread wide enough that float32
    rounding cannot flip an argmax."""
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the registered function's launches of the Triton kernel (a silent SDPA fallback must not pass)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return tree_attention(*args, **kwargs)

    monkeypatch.setattr(tree_attention_module, "tree_attention", counting)
    return calls


def test_registered_function_matches_sdpa_on_a_tree_forward(kernel_calls):
    model, name = tiny_llama(), register_tree_attention()
    tree = DraftTree(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, 0, 0, 1, -1]))
    prompt = repetitive_prompt(100, seed=0, length=40)

    def tree_logits(implementation: str) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        backend = HFBackend(model)
        state = backend.prefill(prompt[:-1])
        return backend.score_tree(state, prompt[-1], tree)

    expected = tree_logits("sdpa")
    got = tree_logits(name)
    assert model.config._attn_implementation == name
    assert len(kernel_calls) == model.config.num_hidden_layers  # the prefill went to SDPA, the tree forward not
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_through_the_kernel_equals_reference_decoder(kernel_calls):
    model, name = tiny_llama(), register_tree_attention()
    prompt = repetitive_prompt(100, seed=1, length=48)
    rule = StopRule(24)
    model.set_attn_implementation("sdpa")
    expected = reference_decode(HFBackend(model), prompt, GREEDY, rule)
    model.set_attn_implementation(name)
    out = SpeculativeGenerator(model, drafter="ngram").generate(prompt, max_new_tokens=24)
    assert out.token_ids == expected
    assert len(kernel_calls) == 2 * out.stats.target_forwards
    assert out.stats.tau > 1.0, "no draft was ever accepted: the test would not exercise tree verification"


def test_graph_backend_steps_go_through_the_kernel_with_the_prefix_on_the_device(kernel_calls):
    from specdec.backends.graph import GraphBackend

    model, name = tiny_llama(), register_tree_attention()
    prompt = repetitive_prompt(100, seed=2, length=48)
    model.set_attn_implementation("sdpa")
    expected = reference_decode(HFBackend(model), prompt, GREEDY, StopRule(16))
    model.set_attn_implementation(name)
    backend = GraphBackend(model, max_len=160, buckets=(1, 4, 16, 64))
    out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=16)
    assert out.token_ids == expected
    assert out.stats.tau > 1.0
    prefill_steps = 1  # the 47 cached prompt tokens: one causal step of the 64 bucket
    assert len(kernel_calls) == model.config.num_hidden_layers * (out.stats.target_forwards + prefill_steps)
    assert kernel_calls[0][2] == 64 and backend.eager_steps == 0


def test_graph_backend_switches_the_attention_for_its_steps_only(kernel_calls):
    from specdec.backends.graph import GraphBackend

    model, name = tiny_llama(), register_tree_attention()
    model.set_attn_implementation("sdpa")
    prompt = repetitive_prompt(100, seed=3, length=40)
    expected = reference_decode(HFBackend(model), prompt, GREEDY, StopRule(16))
    backend = GraphBackend(model, max_len=128, buckets=(1, 4, 16, 64), attention=name)
    out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=16)
    assert out.token_ids == expected
    prefill_steps = 1  # the 39 cached prompt tokens: one causal step of the 64 bucket
    assert len(kernel_calls) == model.config.num_hidden_layers * (out.stats.target_forwards + prefill_steps)
    assert model.config._attn_implementation == "sdpa"  # the model's own setting outside the steps


def hf_call_inputs(prefix_len=20, tree_size=4, seed=3):
    q, k, v, mask = make_inputs(1, 2, 4, tree_size, prefix_len, 32, torch.float32, seed=seed)
    allowed = torch.ones(tree_size, prefix_len + tree_size, dtype=torch.bool)
    allowed[:, prefix_len:] = mask
    float_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    return module, q, k, v, float_mask


def sdpa_reference(module, q, k, v, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask)[0]


def test_fallback_warns_once_and_stays_correct(monkeypatch, kernel_calls):
    module, q, k, v, mask = hf_call_inputs()
    monkeypatch.setattr(tree_attention_module, "kernel_available", lambda device: False)
    tree_attention_module._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tree_attention_forward(module, q, k, v, mask)[0]
        second = tree_attention_forward(module, q, k, v, mask)[0]
    assert [str(w.message) for w in caught] == ["specdec tree attention falls back to SDPA: Triton or CUDA is "
                                                "unavailable"]
    assert not kernel_calls
    expected = sdpa_reference(module, q, k, v, mask)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_masked_prefix_and_causal_prefill_go_to_sdpa(kernel_calls):
    module, q, k, v, mask = hf_call_inputs()
    padded = mask.clone()
    padded[..., :3] = torch.finfo(torch.float32).min  # left padding: the prefix is not all visible
    torch.testing.assert_close(tree_attention_forward(module, q, k, v, padded)[0],
                               sdpa_reference(module, q, k, v, padded))
    prefill = tree_attention_forward(module, q, k[:, :, -4:], v[:, :, -4:], None)[0]  # T = K = 4, no mask
    torch.testing.assert_close(prefill, sdpa_reference(module, q, k[:, :, -4:], v[:, :, -4:], None))
    assert not kernel_calls
    torch.testing.assert_close(tree_attention_forward(module, q, k, v, mask)[0], sdpa_reference(module, q, k, v, mask))
    assert len(kernel_calls) == 1


# ------------------------------------------------------------------------------------------------ KV compaction

def accepted_path_positions(tree_size: int, path_len: int, root: int, generator: torch.Generator) -> torch.Tensor:
    """Positions root + 1 + node of a strictly increasing node path (as an accepted path is): src[j] >= dst[j]."""
    nodes = torch.randperm(tree_size, generator=generator)[:path_len].sort().values
    return root + 1 + nodes


@pytest.mark.parametrize("dtype,head_dim,path_len", [(torch.float32, 64, 5), (torch.bfloat16, 59, 8),
                                                     (torch.float16, 128, 0)])
def test_kv_compact_matches_reference(dtype, head_dim, path_len):
    generator = torch.Generator().manual_seed(path_len)
    kv = torch.randn(3, 2, 2, 2, 48, head_dim, generator=generator).to(dtype)  # (L, 2, B, Hkv, S_max, D)
    root = 20
    src = accepted_path_positions(12, path_len, root, generator)  # overlaps its destination range
    for dst_start in (root + 1, torch.tensor(root + 1)):
        expected, got = kv.clone(), kv.clone()
        kv_compact_reference(expected, src, dst_start)
        kv_compact(got, src, dst_start, check=True)
        assert torch.equal(got, expected)


def test_kv_compact_adjacent_overlap_and_strided_cache():
    """src[j] = dst[j + 1] (path [1, 2, 3]): a parallel copy over j would read an overwritten row."""
    kv = torch.randn(2, 48, 2, 2, 1, 32).permute(0, 2, 3, 4, 1, 5)  # non-contiguous (L, 2, B, Hkv, S_max, D)
    expected, got = kv.clone(), kv.clone()
    src = torch.tensor([11, 12, 13])
    kv_compact_reference(expected, src, 10)
    kv_compact(got, src, 10)
    assert torch.equal(got, expected)
    assert torch.equal(got[..., 10:13, :], kv[..., 11:14, :])


def test_kv_compact_refuses_a_source_before_its_destination():
    kv = torch.zeros(1, 2, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="dst_start"):
        kv_compact(kv, torch.tensor([3, 4]), 4, check=True)


def test_split_count_keeps_the_grid_to_one_wave_but_for_shared_long_splits():
    """H100 (132 SMs): 32 kv heads split 4 ways (128 programs), not 5 (160: a second wave that ran 1.1-1.4x slower);
    only programs that share their keys (several row tiles) take a second wave, of splits >= LONG_SPLIT_KEYS."""
    from specdec.kernels.tree_attention import num_kv_splits

    assert num_kv_splits(32, 2048) == 4 and num_kv_splits(4, 2048) == 8 and num_kv_splits(4, 100) == 1
    assert all(p * num_kv_splits(p, 1 << 20) <= 132 for p in range(1, 132))
    assert num_kv_splits(200, 8192) == 1
    # 1.1B, 64 queries: 4 kv heads x 8 row tiles; a second wave once the splits reach LONG_SPLIT_KEYS keys
    assert [num_kv_splits(32, p, row_tiles=8) for p in (2048, 4096, 8192, 32768)] == [4, 4, 8, 8]
    assert num_kv_splits(32, 32768, row_tiles=1) == 4  # 7B: one row tile, one wave


def test_small_steps_split_into_short_chunks_and_their_gpu_tiles_stay_exact(monkeypatch):
    """Steps of <= 16 queries split the prefix down to 64-key chunks (32 of them over 2k keys for 4 kv heads), and
    the GPU's small-step tiles (32-key blocks, 2 stages; given to the interpreter here) equal the reference."""
    from specdec.kernels import tree_attention as attention

    original, splits = attention._block_sizes, []

    def gpu_sizes(rows, head_dim, small_step=False):
        with monkeypatch.context() as patch:
            patch.setattr(attention, "interpret_mode", lambda: False)
            return original(rows, head_dim, small_step)

    counted = attention.num_kv_splits
    monkeypatch.setattr(attention, "_block_sizes", gpu_sizes)
    monkeypatch.setattr(attention, "num_kv_splits", lambda *a, **k: splits.append(counted(*a, **k)) or splits[-1])
    assert gpu_sizes(24, 64, True)[1:] == (32, 64, 4, 2) and gpu_sizes(24, 128, True)[1:] == (64, 128, 4, 3)
    assert gpu_sizes(24, 64, False)[1:] == (64, 64, 4, 3)
    for tree_size in (1, 8, 16, 17):
        q, k, v, mask = make_inputs(1, 4, 3, tree_size, 2048, 64, torch.float32, seed=tree_size)
        assert_close_to_reference(tree_attention(q, k, v, mask), q, k, v, 2048, mask)
    assert splits == [32, 32, 32, 8]  # 17 queries: 256-key splits, as before
