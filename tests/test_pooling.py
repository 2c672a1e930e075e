import pytest
import torch

from retrievals.models.pooling import POOLING_FUNCTIONS, Pooling, canonical_pooling_name

# Two texts: 3 real tokens and 2 real tokens, hidden size 2.
REAL = [
    torch.tensor([[1.0, 2.0], [3.0, -4.0], [5.0, 0.5]]),
    torch.tensor([[-1.0, 6.0], [2.0, 2.0]]),
]
EXPECTED = {
    "cls": [[1.0, 2.0], [-1.0, 6.0]],
    "last": [[5.0, 0.5], [2.0, 2.0]],
    "mean": [[3.0, -0.5], [0.5, 4.0]],
    "max": [[5.0, 2.0], [2.0, 6.0]],
    # weights 1,2,3 and 1,2
    "weightedmean": [[(1 + 6 + 15) / 6, (2 - 8 + 1.5) / 6], [(-1 + 4) / 3, (6 + 4) / 3]],
}


def padded(side: str, pad_value: float = 99.0):
    """Batch of REAL padded to length 4 on ``side`` with garbage values in padded positions."""
    hidden = torch.full((2, 4, 2), pad_value)
    mask = torch.zeros(2, 4, dtype=torch.long)
    for row, tokens in enumerate(REAL):
        n = tokens.shape[0]
        span = slice(4 - n, 4) if side == "left" else slice(0, n)
        hidden[row, span] = tokens
        mask[row, span] = 1
    return hidden, mask


@pytest.mark.parametrize("mode", sorted(EXPECTED))
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_matches_hand_computation(mode, side):
    hidden, mask = padded(side)
    out = Pooling(mode)(hidden, mask)
    torch.testing.assert_close(out, torch.tensor(EXPECTED[mode]))


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_pooling_ignores_padding_values(mode):
    a = Pooling(mode)(*padded("right", pad_value=-1e4))
    b = Pooling(mode)(*padded("right", pad_value=1e4))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", sorted(POOLING_FUNCTIONS))
def test_pooling_gradcheck(mode):
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda h: Pooling(mode)(h, mask), (hidden,))


def test_all_modes_have_a_reference():
    assert set(POOLING_FUNCTIONS) == set(EXPECTED)


def test_unknown_pooling_lists_valid_names():
    with pytest.raises(ValueError) as err:
        Pooling("avgg")
    for name in POOLING_FUNCTIONS:
        assert name in str(err.value)
    assert "avgg" in str(err.value)


def test_aliases():
    assert canonical_pooling_name("LastToken") == "last"
    assert canonical_pooling_name("avg") == "mean"
    with pytest.raises(TypeError):
        canonical_pooling_name(None)
