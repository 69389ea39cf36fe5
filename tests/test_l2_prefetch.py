"""The L2 prefetch kernel reads every word of its regions once (its XOR per program equals numpy's)."""

import pytest
import torch

from specdec.kernels.l2_prefetch import l2_prefetch, l2_prefetch_reference


@pytest.mark.parametrize("programs", [1, 4, 7])
def test_every_word_of_every_region_is_read(programs):
    generator = torch.Generator().manual_seed(programs)
    weight = torch.randn(37, 20, generator=generator).to(torch.bfloat16)  # 370 words
    fp32 = torch.randn(3000, generator=generator)  # more than one block
    regions = [weight, weight[5:9], fp32]
    sink = torch.zeros(len(regions), programs, dtype=torch.int32)
    l2_prefetch(regions, sink, programs=programs)
    assert torch.equal(sink, l2_prefetch_reference(regions, programs))
    assert sink.any()


def test_bad_regions_and_sinks_are_refused():
    weight = torch.randn(8, 6)
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch([weight[:, :3]], torch.zeros(1, 4, dtype=torch.int32), programs=4)
    with pytest.raises(ValueError, match="sink"):
        l2_prefetch([weight], torch.zeros(2, 4, dtype=torch.int32), programs=4)
    with pytest.raises(ValueError, match="32-bit"):
        l2_prefetch([torch.zeros(3, dtype=torch.bfloat16)], torch.zeros(1, 4, dtype=torch.int32), programs=4)


def test_a_layers_prefetch_regions_follow_the_budget():
    """The o projection's rows first, then gate/up row pairs, never past the budget (bytes)."""
    from specdec.backends.native import _Layer, _prefetch_regions

    hidden, inter = 8, 12
    out, gate_up = torch.randn(hidden, hidden), torch.randn(2 * inter, hidden)  # fp32: a row is 32 bytes
    layer = _Layer(None, None, None, out, None, gate_up, None)
    assert _prefetch_regions(layer, 0) == []
    (part,) = _prefetch_regions(layer, 3 * 32 + 31)
    assert part.data_ptr() == out.data_ptr() and part.shape == (3, hidden)
    whole, gate, up = _prefetch_regions(layer, hidden * 32 + 2 * 5 * 32)
    assert whole.shape == (hidden, hidden) and gate.shape == up.shape == (5, hidden)
    assert gate.data_ptr() == gate_up.data_ptr() and up.data_ptr() == gate_up[inter].data_ptr()
    regions = _prefetch_regions(layer, 10 ** 9)
    assert sum(r.numel() for r in regions) == out.numel() + gate_up.numel()
