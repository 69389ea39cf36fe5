"""The row GEMMs of a verify step (M = 2..64 queries) with their fused prologue/epilogue equal the unfused torch ops
they replace (F.linear after transformers' RMSNorm, the residual add, SiLU gate, rotary + cache write) within the
kernels' tolerances, on ragged sizes (K = 80, N = 100) and row counts that leave BLOCK_M padded; and the native
forward through them (five launches a layer) equals the unfused one and HF's modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from specdec.backends import native  # noqa: E402
from specdec.backends.native import NativeBackend  # noqa: E402
from specdec.kernels.gemm_rows import MAX_ROWS, rows_gated, rows_linear, rows_qkv_rope  # noqa: E402
from specdec.kernels.rmsnorm import add_rmsnorm_reference  # noqa: E402
from specdec.kernels.rope_cache import rope_cache, rope_cache_reference  # noqa: E402
from specdec.kernels.silu_mul import silu_mul_reference  # noqa: E402
from test_gemv import _truncate, _truncating  # noqa: E402
from test_native_backend import assert_within_twice_torch, float_model  # noqa: E402
from tiny_models import VOCAB, repetitive_prompt  # noqa: E402

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16]
ROWS = [2, 3, 7, 16, 33, 64]
SIZE, FEATURES = 80, 100  # neither a multiple of a tile
CONFIGS = [None, (16, 32, 4, 1)]  # the default (one tile over K here), and 32-column steps over 7 feature tiles


def _normed(x: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    return x if norm is None else add_rmsnorm_reference(x.clone(), norm, EPS)


def _normed_truncated(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """RMSNorm of each row in float32 with the interpreter's truncating bfloat16 roundings."""
    x = x.float()
    return _truncate(_truncate(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)) * norm.float())


def _inputs(dtype, count, features=FEATURES, size=SIZE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, size, generator=generator)
    weight = torch.randn(features, size, generator=generator) / size ** 0.5
    norm = 1 + torch.randn(size, generator=generator) / 4
    bias = torch.randn(features, generator=generator) / 4
    return [t.to(dtype) for t in (x, weight, norm, bias)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ROWS)
@pytest.mark.parametrize("with_norm, with_bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("config", CONFIGS)
def test_rows_linear_matches_linear(dtype, count, with_norm, with_bias, config):
    x, weight, norm, bias = _inputs(dtype, count)
    norm, bias = (norm if with_norm else None), (bias if with_bias else None)
    out = rows_linear(x, weight, norm, EPS, bias, config=config)
    double = [None if t is None else t.double() for t in (x, weight, norm, bias)]
    exact = F.linear(_normed(double[0], double[2]), double[1], double[3])
    same_dtype = F.linear(_normed(x, norm), weight, bias)
    if _truncating(dtype) and norm is not None:
        float_bias = None if bias is None else bias.float()
        same_dtype = _truncate(F.linear(_normed_truncated(x, norm), weight.float(), float_bias))
    assert out.shape == (count, FEATURES) and out.dtype == dtype
    assert_within_twice_torch(out, exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ROWS)
def test_rows_linear_residual_adds_in_place(dtype, count):
    x, weight, _, _ = _inputs(dtype, count, features=53, size=130, seed=1)
    stream = torch.randn(count, 53, generator=torch.Generator().manual_seed(2)).to(dtype)
    exact = stream.double() + F.linear(x.double(), weight.double())
    same_dtype = stream.clone().add_(F.linear(x, weight))
    returned = rows_linear(x, weight, residual=stream, config=(16, 32, 4, 1))
    assert returned is stream
    assert_within_twice_torch(stream, exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ROWS)
@pytest.mark.parametrize("config", CONFIGS)
def test_rows_gated_matches_silu_mul(dtype, count, config):
    x, gate_up, norm, _ = _inputs(dtype, count, features=2 * 45, seed=3)
    out = rows_gated(x, gate_up, norm, EPS, config=config)
    exact = silu_mul_reference(F.linear(_normed(x.double(), norm.double()), gate_up.double()))
    same_dtype = silu_mul_reference(F.linear(_normed(x, norm), gate_up))
    if _truncating(dtype):  # the chain of five roundings, each truncated as the interpreter does
        gate, up = _truncate(F.linear(_normed_truncated(x, norm), gate_up.float())).chunk(2, dim=-1)
        same_dtype = _truncate(_truncate(F.silu(gate)) * up)
    assert out.shape == (count, 45)
    assert_within_twice_torch(out, exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ROWS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_rows_qkv_rope_matches_linear_and_rope_cache(dtype, count, with_bias):
    num_q, num_kv, head_dim, slots_total = 4, 2, 16, 70
    x, qkv, norm, bias = _inputs(dtype, count, features=(num_q + 2 * num_kv) * head_dim, seed=4)
    bias = bias if with_bias else None
    generator = torch.Generator().manual_seed(5)
    angles = torch.rand(90, head_dim // 2, generator=generator) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=1).to(dtype) for f in (torch.cos, torch.sin))
    positions = torch.randperm(90, generator=generator)[:count]
    slots = torch.randperm(slots_total, generator=generator)[:count]

    def run(project, dt):
        keys = torch.zeros(num_kv, slots_total, head_dim, dtype=dt)
        values = torch.zeros_like(keys)
        queries = project(keys, values, *(None if t is None else t.to(dt) for t in (x, qkv, norm, bias, cos, sin)))
        return queries, keys, values

    def fused(keys, values, x_, qkv_, norm_, bias_, cos_, sin_):
        return rows_qkv_rope(x_, qkv_, positions, slots, cos_, sin_, keys, values, num_q, norm_, EPS, bias_)

    def unfused(keys, values, x_, qkv_, norm_, bias_, cos_, sin_, rotate=rope_cache):
        projected = F.linear(_normed(x_, norm_), qkv_, bias_)
        rotate(projected, positions, slots, cos_, sin_, keys, values, num_q)
        return projected[:, : num_q * head_dim]

    def unfused_truncated(keys, values, x_, qkv_, norm_, bias_, cos_, sin_):
        projected = _truncate(F.linear(_normed_truncated(x_, norm_), qkv_, bias_))
        rope_cache_reference(projected, positions, slots, cos_, sin_, keys, values, num_q)
        keys.copy_(_truncate(keys).view(keys.shape))
        projected.copy_(_truncate(projected).view(projected.shape))
        return projected[:, : num_q * head_dim]

    got = run(fused, dtype)
    exact = run(lambda *args: unfused(*args, rotate=rope_cache_reference), torch.float64)
    same_dtype = run(unfused_truncated, torch.float32) if _truncating(dtype) else run(unfused, dtype)
    assert got[0].shape == (count, num_q * head_dim)
    for out, ref, same in zip(got, exact, same_dtype):
        assert_within_twice_torch(out, ref, same)
    untouched = [s for s in range(slots_total) if s not in slots.tolist()]
    assert not got[1][:, untouched].any() and not got[2][:, untouched].any()


def test_rows_kernels_reject_bad_shapes():
    x, weight, norm, bias = _inputs(torch.float32, 5)
    with pytest.raises(ValueError, match=f"1 <= M <= {MAX_ROWS}"):
        rows_linear(torch.zeros(MAX_ROWS + 1, SIZE), weight)
    with pytest.raises(ValueError, match="weight must be"):
        rows_linear(x[:, :50], weight)
    with pytest.raises(ValueError, match="bias must be"):
        rows_linear(x, weight, bias=bias[:7])
    with pytest.raises(ValueError, match="residual must be"):
        rows_linear(x, weight, residual=torch.zeros(4, FEATURES))
    with pytest.raises(ValueError, match="cast one"):
        rows_linear(x.double(), weight)
    with pytest.raises(ValueError, match="even number"):
        rows_gated(x, weight[:99])
    with pytest.raises(ValueError, match="norm weight"):
        rows_gated(x, weight, norm[:10])
    keys = torch.zeros(2, 8, 10)
    cos = torch.zeros(16, 10)
    where = torch.arange(5)
    with pytest.raises(ValueError, match="positions and slots"):
        rows_qkv_rope(x, weight, where[:4], where, cos, cos, keys, keys, 6)
    with pytest.raises(ValueError, match="expected qkv"):
        rows_qkv_rope(x, weight, where, where, cos, cos, keys, keys, 5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("count", [2, 5, 16, 33])
def test_native_forward_through_the_row_gemms_equals_unfused_and_hf(arch, count, monkeypatch):
    """A block of `count` queries after 9 cached tokens: through the row GEMMs (five launches a layer; 33 rows past
    the default ROWS_MAX_QUERIES too), through the unfused forward, and HF's logits of the whole sequence agree, and
    so does the KV both leave in the cache."""
    model = float_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=count, length=9 + count)
    expected = model(torch.tensor([prompt])).logits[0, 9:]
    launches = []
    counted = lambda kernel: lambda *args, **kwargs: launches.append(kernel) or kernel(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(native, "ROWS", native._FusedKernels(*(counted(k) for k in (rows_linear, rows_gated,
                                                                                     rows_qkv_rope))))
    causal = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731
    results = []
    for rows_gemm in (True, False):
        backend = NativeBackend(model, max_len=48)
        backend.native.rows_gemm, backend.native.rows_max_queries = rows_gemm, MAX_ROWS
        state = backend.new_state()
        backend._eager_block(state, prompt[:9], range(9), 0, causal(9), None)
        launches.clear()
        logits = backend._eager_block(state, prompt[9:], range(9, 9 + count), 9, causal(count), None)
        assert len(launches) == (4 * len(model.model.layers) + 1 if rows_gemm else 0)
        results.append((logits, state.buffer[..., : 9 + count, :].clone()))
    (fused, fused_kv), (unfused, unfused_kv) = results
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused_kv, unfused_kv, atol=1e-5, rtol=1e-4)


def test_a_tuned_table_loads_and_a_corrupt_one_is_refused(tmp_path, monkeypatch):
    from specdec.kernels import gemm_rows

    monkeypatch.setattr(gemm_rows, "TUNED", {})
    table = tmp_path / "rows_tuned.json"
    table.write_text('[{"kind": "qkv", "block_m": 16, "rows": 2560, "size": 2048, "config": [32, 256, 4, 3]}]')
    gemm_rows.load_tuned(table)
    assert gemm_rows.TUNED == {("qkv", 16, 2560, 2048): (32, 256, 4, 3)}
    for text in ('[{"kind": "qkv"}]', "not json", '[{"kind": "qkv", "block_m": 16, "rows": 1, "size": 1, '
                 '"config": [0, 1, 1, 1]}]'):
        table.write_text(text)
        with pytest.raises(ValueError, match="table|config"):
            gemm_rows.load_tuned(table)
