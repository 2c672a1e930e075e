"""Regression tests of the review's loss defects (issue 10, items 7 and 12) and the pair-wise hinge loss."""

import math

import pytest
import torch
from torch.nn import functional as F

from retrievals.losses import CrossBatchMemory, InfoNCE, ListwiseKLLoss, PairwiseHingeLoss, SimCSE, get_loss


def emb(*rows):
    return torch.tensor(rows, dtype=torch.double)


# ---------------------------------------------------------------- item 7: cosine scores by default
def test_infonce_scores_cosines_for_unnormalised_models():
    torch.manual_seed(0)
    q, p, n = torch.randn(4, 8, dtype=torch.double), torch.randn(4, 8, dtype=torch.double), torch.randn(4, 8, dtype=torch.double)
    scale = torch.tensor([[30.0], [5.0], [12.0], [80.0]], dtype=torch.double)  # norms of an unnormalised model
    for loss in (InfoNCE(temperature=0.05), SimCSE(temperature=0.05)):
        unit = loss(F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1))
        assert loss(q * scale, p * scale, n * scale).item() == pytest.approx(unit.item(), rel=1e-12)
    # hand computation of the first query's cosine row (candidates: 4 positives, 4 negatives)
    cos = F.normalize(q, dim=-1) @ F.normalize(torch.cat([p, n]), dim=-1).T / 0.05
    expected = -(cos[0, 0] - torch.logsumexp(cos[0], 0))
    row0 = InfoNCE(temperature=0.05, criterion=torch.nn.CrossEntropyLoss(reduction="none"))(q * 40, p * 3, n * 7)[0]
    assert row0.item() == pytest.approx(expected.item(), rel=1e-12)


def test_infonce_dot_similarity_when_asked():
    q, p = emb([2.0, 0.0], [0.0, 3.0]), emb([1.0, 0.0], [0.0, 1.0])
    dot = q @ p.T / 0.5
    expected = -(torch.log_softmax(dot, 1).diagonal()).mean()
    assert InfoNCE(temperature=0.5, similarity="dot")(q, p).item() == pytest.approx(expected.item(), rel=1e-12)
    assert InfoNCE(temperature=0.5)(q, p).item() != pytest.approx(expected.item(), rel=1e-3)
    with pytest.raises(ValueError, match="valid names are: cosine, dot"):
        InfoNCE(similarity="euclid")
    assert get_loss("infonce", similarity="dot").similarity == "dot"


def test_memory_bank_and_listwise_use_cosines():
    torch.manual_seed(1)
    q, p = torch.randn(3, 6, dtype=torch.double), torch.randn(3, 6, dtype=torch.double)
    bank = CrossBatchMemory(InfoNCE(temperature=0.1), size=8)
    bank.bank = torch.randn(5, 6, dtype=torch.double) * 50
    expected = InfoNCE(temperature=0.1)(F.normalize(q, dim=-1), F.normalize(p, dim=-1),
                                        extra_negatives=F.normalize(bank.bank, dim=-1))
    assert bank(q * 9, p * 4).item() == pytest.approx(expected.item(), rel=1e-12)
    n = torch.randn(3, 2, 6, dtype=torch.double)
    teacher = torch.randn(3, 3, dtype=torch.double)
    kl = ListwiseKLLoss(temperature=0.05)
    assert kl(q * 20, p * 3, n * 11, teacher_scores=teacher).item() == pytest.approx(
        kl(F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1), teacher_scores=teacher).item(),
        rel=1e-12)


def test_cosine_infonce_gradcheck():
    torch.manual_seed(2)
    q = (torch.randn(3, 4, dtype=torch.double) * 5).requires_grad_()
    p = (torch.randn(3, 4, dtype=torch.double) * 2).requires_grad_()
    n = torch.randn(3, 4, dtype=torch.double).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: InfoNCE(temperature=0.2, symmetric=True)(a, b, c), (q, p, n))


# ---------------------------------------------------------------- item 12: symmetric masking both ways
def test_symmetric_infonce_masks_duplicate_positives_in_both_directions():
    t = 1.0
    q = emb([1.0, 0.0], [0.8, 0.6], [0.0, 1.0])
    p = emb([0.6, 0.8], [0.6, 0.8], [1.0, 0.0])  # queries 0 and 1 share a positive text
    ids = torch.tensor([7, 7, 9])
    loss = InfoNCE(temperature=t, symmetric=True)(q, p, positive_ids=ids)

    def ce(scores, labels, masked):
        total = 0.0
        for row, label in enumerate(labels):
            keep = [j for j in range(scores.shape[1]) if j == label or (row, j) not in masked]
            total += -(scores[row, label] - torch.logsumexp(scores[row, keep], 0)).item()
        return total / len(labels)

    forward = ce(q @ p.T / t, [0, 1, 2], {(0, 1), (1, 0)})
    backward = ce(p @ q.T / t, [0, 1, 2], {(0, 1), (1, 0)})  # positive 0 is also query 1's positive
    assert loss.item() == pytest.approx((forward + backward) / 2, rel=1e-12)
    unmasked_back = ce(p @ q.T / t, [0, 1, 2], set())
    assert not math.isclose(backward, unmasked_back, rel_tol=1e-3)


# ---------------------------------------------------------------- the seed's pair-wise hinge loss
def test_pairwise_hinge_loss_by_hand():
    q = emb([1.0, 0.0], [0.0, 2.0])
    p = emb([1.0, 1.0], [0.0, 1.0])
    n = emb([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [-1.0, 1.0]])
    c = 1 / math.sqrt(2)
    # s(q,p), s(q,n): query 0 -> c, (1, 0); query 1 -> 1, (0, c)
    expected = (max(0, 1 - c + 0.2) + max(0, 0 - c + 0.2) + max(0, 0 - 1 + 0.2) + max(0, c - 1 + 0.2)) / 4
    assert PairwiseHingeLoss()(q, p, n).item() == pytest.approx(expected, rel=1e-12)
    assert PairwiseHingeLoss(margin=0.0)(q, p, emb([[-1.0, 0.0]], [[0.0, -1.0]])).item() == 0.0
    args = tuple(t.clone().requires_grad_() for t in (q + 0.1, p, n))
    assert torch.autograd.gradcheck(lambda a, b, c: PairwiseHingeLoss(margin=0.3)(a, b, c), args)
