"""The one-token GEMV kernels with their fused prologue/epilogue equal the unfused torch ops they replace (F.linear
after transformers' RMSNorm, the residual add, SiLU gate, rotary + cache write) within the kernels' tolerances, on
odd sizes that leave every tile ragged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from specdec.kernels.gemv import gemv, gemv_gated, gemv_qkv_rope  # noqa: E402
from specdec.kernels.tree_attention import interpret_mode  # noqa: E402
from specdec.kernels.rmsnorm import add_rmsnorm_reference  # noqa: E402
from specdec.kernels.rope_cache import rope_cache_reference  # noqa: E402
from specdec.kernels.silu_mul import silu_mul_reference  # noqa: E402
from test_native_backend import DTYPES, assert_within_twice_torch  # noqa: E402

EPS = 1e-5
CONFIGS = [None, (8, 32, 4, 1)]  # the default (whole rows here), and 32-column chunks after a pass for the norm


def _truncating(dtype) -> bool:
    """Triton's interpreter rounds float32 -> bfloat16 by truncation; a chain of five roundings (norm, linear,
    silu, product) then drifts past the 4x allowance. There the same-dtype baseline truncates too."""
    return dtype == torch.bfloat16 and interpret_mode()


def _truncate(t: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 -> float32 by truncation, as the interpreter rounds."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _gated_truncated(x, gate_up, norm):
    """The unfused chain (norm, linear, silu, product) in float32, each bfloat16 rounding truncated."""
    xf = x.float()
    normed = _truncate(_truncate(xf * torch.rsqrt(xf.pow(2).mean() + EPS)) * norm.float())
    gate, up = _truncate(gate_up.float() @ normed).chunk(2)
    return _truncate(_truncate(F.silu(gate)) * up)


def _normed(x: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    return x if norm is None else add_rmsnorm_reference(x.clone()[None], norm, EPS)[0]


def _inputs(dtype, rows=37, size=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, generator=generator)
    weight = torch.randn(rows, size, generator=generator) / size ** 0.5
    norm = 1 + torch.randn(size, generator=generator) / 4
    bias = torch.randn(rows, generator=generator) / 4
    return [t.to(dtype) for t in (x, weight, norm, bias)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("config", CONFIGS)
def test_gemv_matches_linear(dtype, with_norm, with_bias, config):
    x, weight, norm, bias = _inputs(dtype)
    norm, bias = (norm if with_norm else None), (bias if with_bias else None)
    out = gemv(x, weight, norm, EPS, bias, config=config)
    double = [None if t is None else t.double() for t in (x, weight, norm, bias)]
    exact = F.linear(_normed(double[0], double[2]), double[1], double[3])
    same_dtype = F.linear(_normed(x, norm), weight, bias)
    assert out.shape == (1, 37)
    assert_within_twice_torch(out[0], exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_residual_adds_in_place(dtype):
    x, weight, _, _ = _inputs(dtype, rows=53, size=130, seed=1)
    stream = torch.randn(1, 53, generator=torch.Generator().manual_seed(2)).to(dtype)
    exact = stream.double() + F.linear(x.double(), weight.double())
    same_dtype = stream.clone().add_(F.linear(x, weight))
    returned = gemv(x[None], weight, residual=stream)
    assert returned is stream
    assert_within_twice_torch(stream, exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_gemv_gated_matches_silu_mul(dtype, config):
    x, gate_up, norm, _ = _inputs(dtype, rows=2 * 45, size=97, seed=3)
    out = gemv_gated(x, gate_up, norm, EPS, config=config)
    exact = silu_mul_reference(F.linear(_normed(x.double(), norm.double()), gate_up.double()))
    same_dtype = silu_mul_reference(F.linear(_normed(x, norm), gate_up))
    if _truncating(dtype):
        same_dtype = _gated_truncated(x, gate_up, norm)
    assert out.shape == (1, 45)
    assert_within_twice_torch(out[0], exact, same_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("config", CONFIGS)
def test_gemv_qkv_rope_matches_linear_and_rope_cache(dtype, head_dim, config):
    num_q, num_kv, size, slots_total = 4, 2, 97, 11
    rows = (num_q + 2 * num_kv) * head_dim
    x, qkv, norm, bias = _inputs(dtype, rows=rows, size=size, seed=4)
    generator = torch.Generator().manual_seed(5)
    angles = torch.rand(20, head_dim // 2, generator=generator) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=1).to(dtype) for f in (torch.cos, torch.sin))
    position, slot = torch.tensor([13]), torch.tensor([7])

    def run(fn, dt, *weights):
        keys = torch.zeros(num_kv, slots_total, head_dim, dtype=dt)
        values = torch.zeros_like(keys)
        queries = fn(keys, values, *(w.to(dt) for w in weights))
        return queries.reshape(-1), keys, values

    def fused(keys, values, x_, qkv_, norm_, bias_, cos_, sin_):
        return gemv_qkv_rope(x_, qkv_, position, slot, cos_, sin_, keys, values, num_q, norm_, EPS, bias_,
                             config=config)

    def unfused(keys, values, x_, qkv_, norm_, bias_, cos_, sin_):
        projected = F.linear(_normed(x_, norm_), qkv_, bias_)[None]
        rope_cache_reference(projected, position, slot, cos_, sin_, keys, values, num_q)
        return projected[0, : num_q * head_dim]

    def unfused_truncated(keys, values, x_, qkv_, norm_, bias_, cos_, sin_):
        normed = _truncate(_truncate(x_ * torch.rsqrt(x_.pow(2).mean() + EPS)) * norm_)
        projected = _truncate(qkv_ @ normed + bias_)[None]
        rope_cache_reference(projected, position, slot, cos_, sin_, keys, values, num_q)
        keys.copy_(_truncate(keys).view(keys.shape))
        projected.copy_(_truncate(projected).view(projected.shape))
        return projected[0, : num_q * head_dim]

    weights = (x, qkv, norm, bias, cos, sin)
    got = run(fused, dtype, *weights)
    exact = run(unfused, torch.float64, *weights)
    same_dtype = run(unfused_truncated, torch.float32, *weights) if _truncating(dtype) else run(unfused, dtype, *weights)
    for out, ref, same in zip(got, exact, same_dtype):
        assert_within_twice_torch(out, ref, same)
    untouched = [s for s in range(slots_total) if s != 7]
    assert not got[1][:, untouched].any() and not got[2][:, untouched].any()


def test_gemv_rejects_bad_shapes():
    x, weight, norm, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        gemv(x[:50], weight)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.stack([x, x]), weight)
    with pytest.raises(ValueError, match="norm weight"):
        gemv(x, weight, norm[:10])
    with pytest.raises(ValueError, match="even number"):
        gemv_gated(x, weight)


def test_a_tuned_table_loads_and_a_corrupt_one_is_refused(tmp_path, monkeypatch):
    from specdec.kernels import gemv as module

    monkeypatch.setattr(module, "TUNED", {})
    good = tmp_path / "tuned.json"
    good.write_text('[{"kind": "qkv", "rows": 2560, "size": 2048, "config": [4, 2048, 4, 1]}]')
    module.load_tuned(good)
    assert module.TUNED == {("qkv", 2560, 2048): (4, 2048, 4, 1)}
    for text in ('[{"kind": "qkv"}]', "not json", '[{"kind": "qkv", "rows": 1, "size": 1, "config": [0, 1, 1, 1]}]'):
        good.write_text(text)
        with pytest.raises(ValueError, match="tuned|config"):
            module.load_tuned(good)
