"""The embedding kernel copies the ids' rows exactly (any dtype, widths that are no multiple of a block)."""

import pytest
import torch

from specdec.kernels.embedding import embedding, embedding_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count, width", [(1, 64), (7, 100), (16, 768)])
def test_rows_are_copied_exactly(dtype, count, width):
    generator = torch.Generator().manual_seed(count)
    table = torch.randn(50, width, generator=generator).to(dtype)
    tokens = torch.randint(0, 50, (count,), generator=generator)
    tokens[0] = 49  # the last row too
    assert torch.equal(embedding(tokens, table), embedding_reference(tokens, table))


def test_bad_inputs_are_refused():
    table = torch.randn(10, 8)
    with pytest.raises(ValueError, match="1-D integer"):
        embedding(torch.zeros(2, 2, dtype=torch.long), table)
    with pytest.raises(ValueError, match="unit column stride"):
        embedding(torch.zeros(2, dtype=torch.long), table.t())
    assert embedding(torch.zeros(0, dtype=torch.long), table).shape == (0, 8)
