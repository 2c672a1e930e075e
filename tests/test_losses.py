import math

import pytest
import torch
from torch import nn

from retrievals.losses import (
    LOSSES,
    ArcFaceAdaptiveMarginLoss,
    CircleLoss,
    CoSENT,
    InfoNCE,
    ListwiseKLLoss,
    MarginMSELoss,
    PairwiseLogisticLoss,
    SimCSE,
    TripletLoss,
    get_loss,
)

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
N = torch.tensor([[0.0, 1.0], [1.0, 0.0]])


def nll(scores, label):
    return -(scores[label] - math.log(sum(math.exp(s) for s in scores)))


def test_infonce_in_batch_matches_hand():
    expected = (nll([1.0, 0.6], 0) + nll([0.0, 0.8], 1)) / 2
    assert InfoNCE(temperature=1.0)(Q, P).item() == pytest.approx(expected, rel=1e-6)
    # with one hard negative per query: candidates [p0, p1, n0, n1]
    expected = (nll([1.0, 0.6, 0.0, 1.0], 0) + nll([0.0, 0.8, 1.0, 0.0], 1)) / 2
    assert InfoNCE(temperature=1.0)(Q, P, N).item() == pytest.approx(expected, rel=1e-6)
    # temperature divides scores
    expected = (nll([2.0, 1.2], 0) + nll([0.0, 1.6], 1)) / 2
    assert InfoNCE(temperature=0.5)(Q, P).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_without_in_batch_and_symmetric():
    expected = (nll([1.0, 0.0], 0) + nll([0.8, 0.0], 0)) / 2
    loss = InfoNCE(temperature=1.0, use_inbatch_negative=False)(Q, P, N.unsqueeze(1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="needs hard negatives"):
        InfoNCE(use_inbatch_negative=False)(Q, P)
    forward = (nll([1.0, 0.6], 0) + nll([0.0, 0.8], 1)) / 2
    backward = (nll([1.0, 0.0], 0) + nll([0.6, 0.8], 1)) / 2  # positives against queries
    assert InfoNCE(temperature=1.0, symmetric=True)(Q, P).item() == pytest.approx((forward + backward) / 2, rel=1e-6)


def test_infonce_masks_duplicate_positive_texts_with_label_smoothing():
    ids = torch.tensor([7, 7])  # both positives are the same text
    loss = InfoNCE(temperature=1.0)(Q, P, positive_ids=ids)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # each query's only real candidate is its positive
    smooth = InfoNCE(nn.CrossEntropyLoss(label_smoothing=0.1), temperature=1.0)
    value = smooth(Q, P, N, positive_ids=ids, negative_ids=torch.tensor([1, 2]))
    assert torch.isfinite(value)
    # row 0 keeps [p0, n0, n1]; row 1 keeps [p1, n0, n1]
    rows = [([1.0, 0.0, 1.0], 0), ([0.8, 1.0, 0.0], 0)]
    expected = 0
    for scores, label in rows:
        logp = [s - math.log(sum(math.exp(x) for x in scores)) for s in scores]
        expected += 0.9 * -logp[label] + 0.1 * -sum(logp) / 3
    assert value.item() == pytest.approx(expected / 2, rel=1e-6)


def test_seed_positional_criterion_and_batch_of_one():
    loss_fn = InfoNCE(nn.CrossEntropyLoss(label_smoothing=0.05), temperature=0.02)
    assert loss_fn.temperature == 0.02 and loss_fn.criterion.label_smoothing == 0.05
    assert InfoNCE()(Q[:1], P[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert InfoNCE(temperature=1.0)(Q[:1], P[:1], N[:1]).item() == pytest.approx(nll([1.0, 0.0], 0), rel=1e-6)


def test_simcse_is_in_batch_infonce():
    views = torch.tensor([[1.0, 0.1], [0.2, 1.0]])
    assert SimCSE(temperature=1.0)(Q, views).item() == pytest.approx(InfoNCE(temperature=1.0)(Q, views).item())
    with pytest.raises(ValueError, match="second view"):
        SimCSE()(Q)


def test_triplet_is_a_true_hinge():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    expected = (0.0 + (1 - 2 ** -0.5 + 0.5)) / 2
    assert TripletLoss(margin=0.5)(q, p, n).item() == pytest.approx(expected, rel=1e-6)
    assert TripletLoss(margin=0.5)(q[:1], p[:1], n[:1]).item() == 0.0  # satisfied margin: exactly zero
    with pytest.raises(ValueError, match="needs negatives"):
        TripletLoss()(q, p)


def test_pairwise_logistic():
    q, p, n = Q[:1], torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    expected = math.log(1 + math.exp(-(2 ** -0.5 - 1.0) / 0.5))
    assert PairwiseLogisticLoss(temperature=0.5)(q, p, n).item() == pytest.approx(expected, rel=1e-6)


def test_cosent_matches_hand_and_all_equal_labels():
    # unit vectors at chosen cosines with e1
    cos = torch.tensor([0.9, 0.2, 0.5])
    query = torch.tensor([[1.0, 0.0]] * 3)
    positive = torch.stack([cos, (1 - cos**2).sqrt()], dim=1)
    labels = torch.tensor([5.0, 1.0, 3.0])
    expected = math.log(1 + math.exp(20 * -0.7) + math.exp(20 * -0.4) + math.exp(20 * -0.3))
    assert CoSENT()(query, positive, labels=labels).item() == pytest.approx(expected, rel=1e-4)
    assert CoSENT()(query, positive, labels=torch.ones(3)).item() == 0.0
    assert CoSENT()(query[:1], positive[:1], labels=labels[:1]).item() == 0.0


def test_circle_matches_hand():
    q, p = Q[:1], torch.tensor([[0.6, 0.8]])
    n = torch.tensor([[[0.8, 0.6], [0.0, 1.0]]])
    m, g = 0.25, 32.0
    s_p, s_n = 0.6, [0.8, 0.0]
    lp = -g * max(0, 1 + m - s_p) * (s_p - (1 - m))
    ln = [g * max(0, s + m) * (s - m) for s in s_n]
    expected = math.log(1 + math.exp(math.log(sum(math.exp(x) for x in ln)) + lp))
    assert CircleLoss(margin=m, gamma=g)(q, p, n).item() == pytest.approx(expected, rel=1e-5)


def test_arcface_matches_hand_and_no_nan():
    loss_fn = ArcFaceAdaptiveMarginLoss(2, 2, scale=10.0, margin=0.3)
    with torch.no_grad():
        loss_fn.weight.copy_(torch.eye(2))
    theta = 0.5
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]])
    logits = [10 * math.cos(theta + 0.3), 10 * math.sin(theta)]
    assert loss_fn(emb, labels=torch.tensor([0])).item() == pytest.approx(nll(logits, 0), rel=1e-5)
    # an embedding exactly on its class centre: cos = 1 must not give NaN values or gradients
    exact = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = loss_fn(exact, labels=torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(exact.grad).all()
    adaptive = ArcFaceAdaptiveMarginLoss(2, 2, margin=0.4, class_counts=torch.tensor([100, 1]))
    assert adaptive.margins[1] == pytest.approx(0.4) and adaptive.margins[0] == pytest.approx(0.4 / 100**0.25)


def test_listwise_kl_and_margin_mse():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.5, 0.0]])
    n = torch.tensor([[[0.0, 1.0], [0.25, 0.0]]])
    teacher = torch.tensor([[2.0, 0.0, 1.0]])
    student = [0.5, 0.0, 0.25]
    lt = [t - math.log(sum(math.exp(x) for x in [2.0, 0.0, 1.0])) for t in [2.0, 0.0, 1.0]]
    ls = [s - math.log(sum(math.exp(x) for x in student)) for s in student]
    expected = sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    kl = ListwiseKLLoss(temperature=1.0, similarity="dot")  # raw inner products, as computed by hand above
    assert kl(q, p, n, teacher_scores=teacher).item() == pytest.approx(expected, rel=1e-5)
    mm = ((0.5 - 0.0) - (2.0 - 0.0)) ** 2 + ((0.5 - 0.25) - (2.0 - 1.0)) ** 2
    assert MarginMSELoss()(q, p, n, teacher_scores=teacher).item() == pytest.approx(mm / 2, rel=1e-6)
    with pytest.raises(ValueError, match="teacher_scores"):
        MarginMSELoss()(q, p, n, teacher_scores=teacher[:, :2])


def _inputs(seed=0, batch=3, negs=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.double, requires_grad=True)  # noqa: E731
    return make(batch, dim), make(batch, dim), make(batch, negs, dim)


GRAD_CASES = {
    "infonce": lambda q, p, n: InfoNCE(temperature=0.5)(q, p, n),
    "infonce_no_inbatch": lambda q, p, n: InfoNCE(temperature=0.5, use_inbatch_negative=False)(q, p, n),
    "infonce_symmetric": lambda q, p, n: InfoNCE(temperature=0.5, symmetric=True)(q, p),
    "simcse": lambda q, p, n: SimCSE(temperature=0.5)(q, p),
    "triplet": lambda q, p, n: TripletLoss(margin=2.0)(q, p, n),
    "logistic": lambda q, p, n: PairwiseLogisticLoss(temperature=0.5)(q, p, n),
    "cosent": lambda q, p, n: CoSENT(scale=2.0)(q, p, labels=torch.tensor([1.0, 3.0, 2.0])),
    "circle": lambda q, p, n: CircleLoss(gamma=2.0, detach_weights=False)(q, p, n),
    "listwise_kl": lambda q, p, n: ListwiseKLLoss(temperature=0.5)(q, p, n, teacher_scores=torch.rand(3, 3).double()),
    "margin_mse": lambda q, p, n: MarginMSELoss()(q, p, n, teacher_scores=torch.rand(3, 3).double()),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name):
    torch.manual_seed(0)
    q, p, n = _inputs()
    fn = GRAD_CASES[name]
    if name in ("listwise_kl", "margin_mse"):
        teacher = torch.rand(3, 3, dtype=torch.double)
        loss_cls = ListwiseKLLoss(temperature=0.5) if name == "listwise_kl" else MarginMSELoss()
        fn = lambda q, p, n: loss_cls(q, p, n, teacher_scores=teacher)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, p, n))


def test_gradcheck_arcface():
    loss_fn = ArcFaceAdaptiveMarginLoss(4, 3, scale=2.0, margin=0.2).double()
    q, _, _ = _inputs()
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels=torch.tensor([0, 2, 1])), (q,))


def test_registry_lists_valid_names():
    assert isinstance(get_loss("InfoNCE", temperature=0.1), InfoNCE)
    with pytest.raises(ValueError) as err:
        get_loss("info_nce")
    for name in LOSSES:
        assert name in str(err.value)
