"""Verification metrics: LFW 10-fold accuracy on constructed scores with known answers, TAR@FAR, ROC/AUC, embedding."""
import itertools

import numpy as np
import pytest
import torch

from data.face import PairSet
from data.face.transforms import ArrayFaces
from engine.verification import (best_threshold, embed, evaluate_pairset, evaluate_sets, kfold_accuracy,
                                 mean_accuracy, pair_scores, roc_curve, roc_image, tar_at_far,
                                 verification_metrics)


def test_perfectly_separable_is_100_percent():
    rng = np.random.default_rng(0)
    issame = rng.random(200) < 0.5
    scores = np.where(issame, 0.5 + 0.5 * rng.random(200), 0.4 * rng.random(200))
    r = verification_metrics(scores, issame)
    assert r.acc == 1.0 and r.acc_std == 0.0 and r.auc == 1.0
    assert ((r.thresholds > 0.4) & (r.thresholds < 0.5)).all()


def test_known_fold_accuracies_with_hard_impostors():
    """10 folds of 5 genuine (0.6-0.9) and 5 impostor pairs; fold k has h_k impostors at 0.95, above every
    genuine pair. Each fold's 9 training folds hold at most 9 such impostors against 45 genuine pairs, so the
    best training threshold is the midpoint of the gap between the training folds' easy impostors and
    genuine pairs, and fold k scores (10 - h_k) / 10."""
    rng = np.random.default_rng(1)
    h = np.array([k % 3 for k in range(10)])
    scores, issame = [], []
    for hk in h:
        scores += list(0.6 + 0.3 * rng.random(5)) + [0.95] * hk + list(0.1 + 0.3 * rng.random(5 - hk))
        issame += [True] * 5 + [False] * 5
    scores, issame = np.array(scores), np.array(issame)
    accs, thrs = kfold_accuracy(scores, issame, 10)
    assert np.allclose(accs, (10 - h) / 10)
    for k in range(10):
        train = np.ones(100, bool)
        train[10 * k:10 * k + 10] = False
        easy_max = scores[train & ~issame & (scores < 0.5)].max()
        assert thrs[k] == pytest.approx(0.5 * (easy_max + scores[train & issame].min()))
    r = verification_metrics(scores, issame)
    assert r.acc == pytest.approx(1 - h.mean() / 10) and r.acc_std == pytest.approx(h.std() / 10)


def test_best_threshold_against_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(20):
        scores = rng.integers(0, 6, 15).astype(float)  # many ties
        issame = rng.random(15) < 0.5
        candidates = np.concatenate([[-np.inf], scores])
        brute = max(np.mean((scores > t) == issame) for t in candidates)
        thr, acc = best_threshold(scores, issame)
        assert acc == pytest.approx(brute) and np.mean((scores > thr) == issame) == pytest.approx(acc)


def test_tar_at_far():
    imp = np.arange(1000) / 1000.0          # impostor scores 0.000 ... 0.999
    gen = np.array([0.9975, 0.9985, 0.5, 0.999, 1.2])
    scores = np.concatenate([imp, gen])
    issame = np.concatenate([np.zeros(1000, bool), np.ones(5, bool)])
    # FAR 1e-3 of 1000 impostors lets one through (0.999): the threshold is the next, 0.998
    tar, note = tar_at_far(scores, issame, 1e-3)
    assert note == "" and tar == pytest.approx(np.mean(gen > 0.998))
    tar, note = tar_at_far(scores, issame, 1e-4)
    assert tar is None and "10000 impostor pairs" in note and "1000 impostor" in note
    r = verification_metrics(scores, issame, nfolds=5)
    assert r.tar[1e-3] == pytest.approx(0.6) and r.tar[1e-4] is None and 1e-4 in r.tar_notes
    assert "tar@far=0.001" in r.scalars() and "tar@far=0.0001" not in r.scalars()


def test_roc_and_auc_against_pairwise_definition():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 8, 60) / 8.0
    issame = rng.random(60) < 0.4
    g, i = scores[issame], scores[~issame]
    expected = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(g, i)])
    r = verification_metrics(scores, issame, nfolds=6)
    assert r.auc == pytest.approx(expected)
    fpr, tpr = roc_curve(scores, issame)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    img = roc_image(fpr, tpr, size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert ((img[..., 0] > 150) & (img[..., 1] < 100)).any()  # the red curve is drawn


class _Flatten(torch.nn.Module):
    """Embedding = a fixed linear map of the image; its flip-sum is easy to predict."""

    def __init__(self, n):
        super().__init__()
        self.proj = torch.nn.Linear(n, 4, bias=False)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.proj(x.flatten(1))


def test_embed_flip_sums_and_restores_mode():
    images = np.random.default_rng(4).integers(0, 256, (5, 6, 6), dtype=np.uint8)
    ds = ArrayFaces(images, np.zeros(5, int), img_size=6, channels=1)
    model = _Flatten(36).train()
    x = torch.stack([ds[i][0] for i in range(5)])
    with torch.no_grad():
        plain, both = model(x), model(x) + model(x.flip(-1))
    assert torch.allclose(embed(model, ds, batch_size=2), plain, atol=1e-5)
    assert torch.allclose(embed(model, ds, batch_size=3, flip=True), both, atol=1e-5)
    assert model.training


def test_evaluate_pairset_end_to_end():
    """Each identity is one image pattern seen with a little noise: genuine pairs are near-identical."""
    rng = np.random.default_rng(5)
    patterns = rng.integers(0, 256, (6, 8, 8))
    labels = np.repeat(np.arange(6), 4)
    images = np.clip(patterns[labels] + rng.integers(-3, 4, (24, 8, 8)), 0, 255).astype(np.uint8)
    idx = np.array(list(itertools.combinations(range(24), 2)))
    rng.shuffle(idx)
    same = labels[idx[:, 0]] == labels[idx[:, 1]]
    ps = PairSet("toy", ArrayFaces(images, labels, img_size=8, channels=1), idx, same)
    model = _Flatten(64)
    r = evaluate_pairset(model, ps, batch_size=7)
    emb = embed(model, ps.images)
    assert r.acc == 1.0 and r.auc == 1.0 and r.num_pairs == len(idx)
    assert r.xnorm == pytest.approx(float(emb.norm(dim=1).mean()))
    scores = pair_scores(emb, ps.pairs)
    assert np.allclose(scores, torch.nn.functional.cosine_similarity(emb[idx[:, 0]], emb[idx[:, 1]]).numpy(),
                       atol=1e-6)
    results = evaluate_sets(model, [ps, PairSet("flipped", ps.images, ps.pairs, ~ps.issame)], flip=True)
    assert set(results) == {"toy", "flipped"} and results["flipped"].auc == 0.0  # every ranking reversed
    assert mean_accuracy(results) == pytest.approx((results["toy"].acc + results["flipped"].acc) / 2)
    with pytest.raises(ValueError, match="no evaluation sets"):
        mean_accuracy({})
