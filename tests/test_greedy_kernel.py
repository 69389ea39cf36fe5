"""The greedy-advance kernel picks what torch.argmax picks (the first of equal maxima, across and within its lanes,
vocabularies past one block) and moves the chain's inputs on by one step."""

import pytest
import torch

from specdec.kernels.greedy import greedy_advance


def run(logits, advance=True):
    picks = torch.full((3,), -1, dtype=torch.long)
    inputs = torch.tensor([7, 40, 33, 41], dtype=torch.long)  # token, position, prefix, slot
    greedy_advance(logits, picks, 1, inputs[:1], inputs[1:2], inputs[2], inputs[3:], advance=advance)
    return picks, inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [5, 1000, 70000])
def test_pick_is_torch_argmax_and_the_inputs_advance(dtype, vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(vocab, generator=generator).to(dtype)
    for ties in ([vocab - 1], [vocab // 2, vocab - 1], [1, vocab // 3, vocab - 2]):  # maxima in several lanes
        logits[ties] = 9.0
        picks, inputs = run(logits)
        assert picks.tolist() == [-1, int(logits.argmax()), -1] and picks[1] == min(ties)
        assert inputs.tolist() == [min(ties), 41, 34, 42]


def test_last_step_only_picks_and_all_minus_inf_picks_zero():
    picks, inputs = run(torch.full((300,), float("-inf")), advance=False)
    assert picks.tolist() == [-1, 0, -1] and inputs.tolist() == [7, 40, 33, 41]


def test_bad_logits_are_refused():
    with pytest.raises(ValueError, match="contiguous"):
        run(torch.randn(2, 10))
