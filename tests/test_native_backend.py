"""The native backend: its three small kernels equal their torch references (flash-attention style tolerances),
tree attention over a block longer than its queries, the Llama-family forward equals HF's modules, and generation
through it keeps the backend contract (greedy output equal to the reference decoder, falls back cleanly)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

pytest.importorskip("triton")

from specdec import SamplingParams, SpeculativeGenerator  # noqa: E402
from specdec.backends.graph import GraphBackend  # noqa: E402
from specdec.backends.hf import HFBackend  # noqa: E402
from specdec.backends.native import NativeBackend, native_backend  # noqa: E402
from specdec.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference  # noqa: E402
from specdec.kernels.rope_cache import rope_cache, rope_cache_reference  # noqa: E402
from specdec.kernels.silu_mul import silu_mul, silu_mul_reference  # noqa: E402
from specdec.kernels.tree_attention import tree_attention, tree_attention_reference  # noqa: E402
from specdec.reference import reference_decode  # noqa: E402
from specdec.stopping import StopRule  # noqa: E402
from test_kernels import FLOOR, random_tree, tree_block  # noqa: E402
from tiny_models import VOCAB, fresh_tiny_model, repetitive_prompt  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_within_twice_torch(out: torch.Tensor, exact: torch.Tensor, same_dtype: torch.Tensor) -> None:
    """The kernel's error against the float64 result <= 2x the same-dtype torch computation's, plus a floor.
    bfloat16 gets 4x here: Triton's interpreter rounds float32 -> bfloat16 its own way, and these kernels round
    twice, as torch does (evals/scripts/gpu_check.py holds them to 2x on the GPU)."""
    baseline = (same_dtype.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    factor = 4 if out.dtype == torch.bfloat16 else 2
    assert error <= factor * baseline + FLOOR[out.dtype] * max(1.0, exact.abs().max().item()), (error, baseline)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm_matches_reference(dtype, with_delta):
    generator = torch.Generator().manual_seed(1)
    hidden, delta = (torch.randn(5, 97, generator=generator).to(dtype) for _ in range(2))
    weight = (1 + torch.randn(97, generator=generator) / 4).to(dtype)
    stream = hidden.clone()
    out = add_rmsnorm(stream, weight, 1e-5, delta if with_delta else None)
    exact_stream = hidden.double()
    exact = add_rmsnorm_reference(exact_stream, weight.double(), 1e-5, delta.double() if with_delta else None)
    same_stream = hidden.clone()
    same_dtype = add_rmsnorm_reference(same_stream, weight, 1e-5, delta if with_delta else None)
    if dtype == torch.bfloat16:  # the interpreter rounds float32 -> bfloat16 its own way (a GPU rounds as torch)
        assert_within_twice_torch(stream, exact_stream, same_stream)
    else:
        assert torch.equal(stream, same_stream)  # the residual add: one rounding, as torch
    assert_within_twice_torch(out, exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(dtype):
    gate_up = torch.randn(3, 2 * 4103, generator=torch.Generator().manual_seed(2)).mul(3).to(dtype)
    exact, same_dtype = silu_mul_reference(gate_up.double()), silu_mul_reference(gate_up)
    assert_within_twice_torch(silu_mul(gate_up), exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 80])
def test_rope_cache_rotates_in_place_and_writes_the_cache_slots(dtype, head_dim):
    generator = torch.Generator().manual_seed(3)
    q_heads, kv_heads, tokens, slots_total = 6, 2, 5, 40
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    angles = torch.arange(64)[:, None] * torch.rand(head_dim // 2, generator=generator)
    cos, sin = (torch.cat([f(angles)] * 2, dim=1).to(dtype) for f in (torch.cos, torch.sin))
    positions, slots = torch.tensor([9, 3, 63, 0, 17]), torch.tensor([31, 4, 5, 39, 0])
    caches = [torch.zeros(kv_heads, slots_total, head_dim, dtype=dtype) for _ in range(4)]
    mine, expected = qkv.clone(), qkv.clone()
    rope_cache(mine, positions, slots, cos, sin, caches[0], caches[1], q_heads)
    rope_cache_reference(expected, positions, slots, cos, sin, caches[2], caches[3], q_heads)
    tolerance = {"atol": 0, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(mine, expected, **tolerance)  # float32 math, one rounding, in both
    torch.testing.assert_close(caches[0], caches[2], **tolerance)
    assert torch.equal(caches[1], caches[3])  # values are copied, not computed
    assert caches[1][:, slots].abs().sum() > 0 and caches[1][:, 1].abs().sum() == 0  # only the slots written


@pytest.mark.parametrize("prefix_len, offset, queries", [(0, 5, 3), (97, 2, 1), (1025, 17, 16)])
def test_tree_attention_with_queries_inside_a_longer_block(prefix_len, offset, queries):
    """W = offset + T block keys from P, the queries the last T of them (a drafter's frontier, a prefill chunk);
    a stale tail after the block is ignored."""
    generator = torch.Generator().manual_seed(prefix_len)
    width = offset + queries
    q = torch.randn(1, 8, queries, 64, generator=generator)
    k, v = (torch.randn(1, 2, prefix_len + width + 7, 64, generator=generator) for _ in range(2))
    block = tree_block(random_tree(width - 1, generator))[offset:]
    exact = tree_attention_reference(q, k, v, prefix_len, block, dtype=torch.float64, block_len=width)
    same_dtype = tree_attention_reference(q, k, v, prefix_len, block, dtype=q.dtype, block_len=width)
    out = torch.full((1, queries, 8, 64), float("nan")).transpose(1, 2)  # written in place, through strides
    result = tree_attention(q, k, v, block, prefix_len=torch.tensor(prefix_len), block_len=width, out=out)
    assert result is out
    assert_within_twice_torch(out, exact, same_dtype)


def float_model(arch: str):
    return fresh_tiny_model(arch).float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_native_forward_equals_hf_modules(arch):
    model = float_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=1)
    expected = model(torch.tensor([prompt])).logits[0]
    backend = NativeBackend(model, max_len=64)
    state = backend.new_state()
    causal = torch.ones(len(prompt), len(prompt), dtype=torch.bool).tril()
    logits = backend._eager_block(state, prompt, range(len(prompt)), 0, causal, None)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(model(torch.tensor([prompt])).logits[0], expected)  # the fused weights left HF's model intact


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_token_steps_through_the_fused_gemvs_equal_hf_modules(arch):
    """Token by token, each step takes `_forward_fused` with the GEMVs (norms, rotary, cache write, gate, residual in the GEMVs)."""
    model = float_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=3, length=20)
    expected = model(torch.tensor([prompt])).logits[0]
    backend = NativeBackend(model, max_len=64)
    assert backend.native.one_token_gemv
    state, one = backend.new_state(), torch.ones(1, 1, dtype=torch.bool)
    for position, token in enumerate(prompt):
        logits = backend._eager_block(state, [token], [position], position, one, None)
        torch.testing.assert_close(logits[0], expected[position], atol=1e-5, rtol=1e-4)
    for index, layer in enumerate(HFBackend(model).prefill(prompt).cache.layers):
        torch.testing.assert_close(state.buffer[index, 0, ..., : len(prompt), :], layer.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.buffer[index, 1, ..., : len(prompt), :], layer.values, atol=1e-5,
                                   rtol=1e-4)


def test_greedy_speculation_through_native_equals_reference_decoder():
    model = float_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=1)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(32))
    backend = NativeBackend(model, max_len=128, buckets=(1, 4, 16))
    assert reference_decode(backend, prompt, SamplingParams(), StopRule(32)) == truth
    out = SpeculativeGenerator(model, drafter="ngram", backend=backend).generate(prompt, max_new_tokens=32)
    assert out.token_ids == truth and out.stats.tau > 1.0
    assert backend.eager_steps == 0
    state = backend.prefill(prompt[:-1])  # the native prefill leaves HF's KV in the buffer (up to float32 rounding)
    for index, layer in enumerate(HFBackend(model).prefill(prompt[:-1]).cache.layers):
        torch.testing.assert_close(state.buffer[index, 0, ..., : state.length, :], layer.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.buffer[index, 1, ..., : state.length, :], layer.values, atol=1e-5,
                                   rtol=1e-4)


def test_a_block_after_rows_already_written_equals_the_graph_backend():
    """The drafter-shaped step (queries written after rows of the same block, L > P) on both forwards."""
    model = float_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=2, length=12)
    block = tree_block(random_tree(6, torch.Generator().manual_seed(4)))  # 7 block keys: 3 written, then 4
    results = []
    for backend in (GraphBackend(model, max_len=64, buckets=(1, 4, 8)), NativeBackend(model, 64, (1, 4, 8))):
        state = backend.prefill(prompt)
        backend.score_block(state, prompt[:3], [12, 13, 13], 12, block[:3, :3])
        results.append(backend.score_block(state, prompt[3:7], [14, 14, 15, 16], 12, block[3:]))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_unsupported_models_fall_back_to_the_graph_backend(arch):
    model = fresh_tiny_model(arch)
    with pytest.warns(RuntimeWarning, match="native backend unavailable"):
        backend = native_backend(model, max_len=64)
    assert type(backend) is GraphBackend
    with pytest.raises(ValueError, match="native forward cannot run"):
        NativeBackend(model, max_len=64)


def test_no_triton_device_falls_back_and_the_name_reaches_the_generator(monkeypatch):
    model = float_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generator = SpeculativeGenerator(model, drafter="ngram", backend="native")
    assert type(generator.backend) is NativeBackend
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter: no kernel can run
    with pytest.warns(RuntimeWarning, match="Triton or CUDA is unavailable"):
        assert type(native_backend(model, max_len=64)) is GraphBackend


def test_model_drafter_runs_its_draft_steps_on_the_native_forward():
    """GraphKV(native=True) (automatic on CUDA for a Llama-family draft): the same greedy output as the reference,
    frontiers written after the nodes already drafted (the non-square steps) included."""
    from specdec.drafters.draft_kv import GraphKV
    from specdec.drafters.model import ModelDrafter

    target, draft = float_model("llama"), float_model("llama")  # self-drafting: deep accepted trees
    drafter = ModelDrafter(draft, mode="tree", graphs=True)
    drafter._new_kv = lambda: GraphKV(draft, None, drafter.width, native=True)
    prompt = repetitive_prompt(VOCAB, seed=3)
    out = SpeculativeGenerator(target, drafter=drafter, controller="heuristic:start_depth=4,max_depth=6").generate(
        prompt, max_new_tokens=24)
    assert out.token_ids == reference_decode(HFBackend(target), prompt, SamplingParams(), StopRule(24))
    assert type(drafter.kv.runner) is NativeBackend and out.stats.drafter_errors == 0 and out.stats.tau > 1.0


# ------------------------------------------------------------------ the shapes of real checkpoints, scaled down

# name -> (config class, q heads, kv heads, tied LM head): head dim 64 and hidden = q heads x 64 as in the real
# models (GQA groups 3, 7 and 6: not powers of two), one layer, a small MLP and vocabulary
REAL_SHAPES = {
    "smollm2-135m": (transformers.LlamaConfig, 9, 3, True),     # HuggingFaceTB/SmolLM2-135M: 9 / 3 heads
    "qwen2-tied": (transformers.Qwen2Config, 6, 2, True),       # Qwen2: q/k/v biases
    "qwen2-untied": (transformers.Qwen2Config, 6, 2, False),
    "qwen2.5-0.5b": (transformers.Qwen2Config, 14, 2, True),    # Qwen2.5(-Coder)-0.5B: 14 / 2 heads
    "qwen2.5-1.5b": (transformers.Qwen2Config, 12, 2, True),    # Qwen2.5(-Coder)-1.5B: 12 / 2 heads
}


def real_shape_model(name: str) -> transformers.PreTrainedModel:
    """A float32 random-init model with the attention shape of the checkpoint `name` (nothing is downloaded). Its
    q/k/v biases and norm weights are random too (the init makes them 0 and 1); init 0.05 (0.02 at this width
    gives flat logits: the greedy output is one token repeated)."""
    config_cls, q_heads, kv_heads, tied = REAL_SHAPES[name]
    extra = {"use_sliding_window": False} if config_cls is transformers.Qwen2Config else {}
    config = config_cls(hidden_size=q_heads * 64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=64,
                        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                        rms_norm_eps=1e-5, max_position_embeddings=128, initializer_range=0.05, vocab_size=VOCAB,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra)
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, config_cls.__name__.replace("Config", "ForCausalLM"))(config).float().eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("proj.bias"):
                parameter.normal_(0.0, 0.5)
            elif "norm" in parameter_name:
                parameter.normal_(1.0, 0.2)
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
    attention = model.model.layers[0].self_attn
    biased = attention.k_proj.bias is not None
    assert attention.head_dim == 64 and biased == (config_cls is transformers.Qwen2Config)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_real_model_shapes_forward_equals_hf_modules(name):
    """One prompt in three steps, one through each forward: 17 queries (the unfused layer), 1 (the GEMVs), 6 (the
    row GEMMs); every step's logits equal HF's over the whole prompt, and so does the KV left in the buffer."""
    model = real_shape_model(name)
    prompt = repetitive_prompt(VOCAB, seed=5)
    expected = model(torch.tensor([prompt])).logits[0]
    backend = NativeBackend(model, max_len=64)
    state, start = backend.new_state(), 0
    for count in (17, 1, 6):
        causal = torch.ones(count, count, dtype=torch.bool).tril()
        logits = backend._eager_block(state, prompt[start: start + count], range(start, start + count), start,
                                      causal, None)
        torch.testing.assert_close(logits, expected[start: start + count], atol=1e-5, rtol=1e-4)
        start += count
    layer = HFBackend(model).prefill(prompt).cache.layers[0]
    torch.testing.assert_close(state.buffer[0, 0, ..., : len(prompt), :], layer.keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.buffer[0, 1, ..., : len(prompt), :], layer.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2-untied"])
def test_real_model_shapes_greedy_speculation_equals_reference_decoder(name):
    """backend="native" by name at the SmolLM2 and Qwen2 shapes: the reference decoder's greedy output, with drafts
    accepted (so the accepted KV was committed) and not a single token repeated."""
    model = real_shape_model(name)
    prompt = repetitive_prompt(VOCAB, seed=2)
    truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(10))
    generator = SpeculativeGenerator(model, drafter="ngram", backend="native")
    assert type(generator.backend) is NativeBackend
    out = generator.generate(prompt, max_new_tokens=10)
    assert out.token_ids == truth and len(set(truth)) > 1
    assert out.stats.drafter_errors == 0 and out.stats.tau > 1.0
