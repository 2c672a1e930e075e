"""InfoNCE with cross-device negatives on 2 CPU processes (gloo) equals one process with the whole batch."""

import os

import pytest
import torch
from torch import nn

from processes import spawn_gloo
from retrievals.losses import InfoNCE

DIM, NEG = 8, 2


def global_batch(sizes):
    g = torch.Generator().manual_seed(0)
    total = sum(sizes)
    q, p = torch.randn(total, DIM, generator=g), torch.randn(total, DIM, generator=g)
    n = torch.randn(total, NEG, DIM, generator=g)
    ids = torch.arange(total)
    ids[-1] = ids[0]  # a duplicate positive text on the other rank: must be masked across devices too
    return q, p, n, ids


def _worker(rank, sizes, out_dir, reduction):
    q, p, n, ids = global_batch(sizes)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    q, p, n = (t[start:stop].clone().requires_grad_(True) for t in (q, p, n))
    loss_fn = InfoNCE(nn.CrossEntropyLoss(reduction=reduction), temperature=0.5, negatives_cross_device=True)
    neg_ids = torch.arange(1000, 1000 + sum(sizes) * NEG)[start * NEG:stop * NEG]
    loss = loss_fn(q, p, n, positive_ids=ids[start:stop], negative_ids=neg_ids)
    loss.sum().backward()
    torch.save({"loss": loss.detach(), "q": q.grad, "p": p.grad, "n": n.grad}, os.path.join(out_dir, f"{rank}.pt"))


def run_ranks(sizes, tmp_path, reduction):
    spawn_gloo(_worker, len(sizes), sizes, str(tmp_path), reduction)
    return [torch.load(tmp_path / f"{r}.pt") for r in range(len(sizes))]


def single_process(sizes, reduction):
    q, p, n, ids = global_batch(sizes)
    q, p, n = (t.clone().requires_grad_(True) for t in (q, p, n))
    loss = InfoNCE(nn.CrossEntropyLoss(reduction=reduction), temperature=0.5)(
        q, p, n, positive_ids=ids, negative_ids=torch.arange(1000, 1000 + sum(sizes) * NEG))
    loss.sum().backward()
    return loss.detach(), q.grad, p.grad, n.grad


def test_cross_device_equals_single_process(tmp_path):
    sizes = [3, 3]
    ranks = run_ranks(sizes, tmp_path, "mean")
    loss, gq, gp, gn = single_process(sizes, "mean")
    world = len(sizes)
    # each rank averages over its own queries; the mean over ranks is the global mean
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    # per rank, gradients are world_size x the global-mean gradients (DDP then averages them)
    torch.testing.assert_close(torch.cat([r["q"] for r in ranks]) / world, gq)
    torch.testing.assert_close(torch.cat([r["p"] for r in ranks]) / world, gp)
    torch.testing.assert_close(torch.cat([r["n"] for r in ranks]) / world, gn)


def test_cross_device_unequal_rank_batches(tmp_path):
    sizes = [4, 2]
    ranks = run_ranks(sizes, tmp_path, "none")
    loss, *_ = single_process(sizes, "none")
    torch.testing.assert_close(torch.cat([r["loss"] for r in ranks]), loss)  # label offsets right per query
