"""Face verification metrics: LFW's 10-fold protocol, TAR at fixed FAR, ROC and AUC.

Protocol (insightface `recognition/eval/verification.py`): the pairs are cut into
10 contiguous folds (sklearn's `KFold(10, shuffle=False)`); for each fold the threshold with the best
accuracy on the other 9 is applied to it; the result is the mean and (population) std of the 10 fold
accuracies. Score = cosine similarity of the L2-normalised embeddings (monotone in insightface's
squared distance, 2 - 2 cos). Instead of a fixed grid, every gap between consecutive distinct
training scores is tried (its midpoint), so the best training threshold is exact; among equally
good thresholds the lowest is taken. Optional flip test-time augmentation embeds an image as
model(x) + model(flipped x), as insightface does. TVConv's mean-centring variant is not used.

TAR at FAR f is pooled over all pairs (insightface interpolates per fold): the threshold lets at most
floor(f * #impostor pairs) impostors through; it needs at least 1/f impostor pairs, else None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.face.pairs import PairSet

FARS = (1e-3, 1e-4)


@dataclass
class VerificationResult:
    acc: float                      # mean of the fold accuracies
    acc_std: float
    fold_accs: np.ndarray
    thresholds: np.ndarray          # the threshold chosen for each fold (cosine similarity)
    auc: float
    tar: dict                       # far -> TAR, or None when the pairs are too few
    tar_notes: dict                 # far -> why TAR is None
    fpr: np.ndarray                 # ROC curve points
    tpr: np.ndarray
    xnorm: float = math.nan         # mean L2 norm of the raw embeddings (collapse diagnostic)
    num_pairs: int = 0

    def scalars(self) -> dict[str, float]:
        """The loggable numbers: acc, acc_std, auc, xnorm, and tar@far=... where available."""
        out = {"acc": self.acc, "acc_std": self.acc_std, "auc": self.auc, "xnorm": self.xnorm}
        out.update({f"tar@far={far:g}": v for far, v in self.tar.items() if v is not None})
        return out


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising the accuracy of `same = score > threshold`."""
    order = np.argsort(scores, kind="stable")
    s, g = scores[order], issame[order].astype(np.int64)
    n = len(s)
    # cut k puts the k lowest scores on the "different" side; only cuts between distinct values.
    cuts = np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1, [n]])
    gen_below = np.concatenate([[0], np.cumsum(g)])[cuts]
    correct = (cuts - gen_below) + (g.sum() - gen_below)
    k = int(np.argmax(correct))
    cut = cuts[k]
    thr = -math.inf if cut == 0 else math.inf if cut == n else 0.5 * (s[cut - 1] + s[cut])
    return float(thr), float(correct[k] / n)


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold test accuracy and threshold; each fold's threshold is fitted on the other folds."""
    if len(scores) < nfolds:
        raise ValueError(f"{len(scores)} pairs cannot make {nfolds} folds")
    folds = np.array_split(np.arange(len(scores)), nfolds)
    accs, thrs = np.empty(nfolds), np.empty(nfolds)
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(scores)), test)
        thrs[k], _ = best_threshold(scores[train], issame[train])
        accs[k] = np.mean((scores[test] > thrs[k]) == issame[test])
    return accs, thrs


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> tuple[float | None, str]:
    """(TAR, "") at the threshold admitting at most floor(far * #impostors) impostors, or
    (None, reason) when there are fewer than 1/far impostor pairs."""
    imp, gen = np.sort(scores[~issame])[::-1], scores[issame]
    need = math.ceil(1.0 / far - 1e-9)
    if len(imp) < need or len(gen) == 0:
        return None, (f"TAR@FAR={far:g} needs >= {need} impostor pairs and a genuine one; "
                      f"this set has {len(imp)} impostor and {len(gen)} genuine pairs")
    allowed = int(math.floor(far * len(imp) + 1e-9))
    return float(np.mean(gen > imp[allowed])), ""


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of `same = score >= t` for t running down the distinct scores, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    s, g = scores[order], issame[order]
    last = np.concatenate([np.flatnonzero(s[1:] != s[:-1]), [len(s) - 1]])
    tp, fp = np.cumsum(g)[last], np.cumsum(~g)[last]
    return (np.concatenate([[0.0], fp / max(fp[-1], 1)]),
            np.concatenate([[0.0], tp / max(tp[-1], 1)]))


def verification_metrics(scores, issame, nfolds: int = 10, fars=FARS) -> VerificationResult:
    """All metrics of one pair set from its scores (higher = more alike) and same-identity flags."""
    scores = np.asarray(scores, np.float64)
    issame = np.asarray(issame, bool)
    accs, thrs = kfold_accuracy(scores, issame, nfolds)
    fpr, tpr = roc_curve(scores, issame)
    tar, notes = {}, {}
    for far in fars:
        tar[far], note = tar_at_far(scores, issame, far)
        if note:
            notes[far] = note
    return VerificationResult(acc=float(accs.mean()), acc_std=float(accs.std()), fold_accs=accs,
                              thresholds=thrs, auc=float(np.trapezoid(tpr, fpr)), tar=tar,
                              tar_notes=notes, fpr=fpr, tpr=tpr, num_pairs=len(scores))


@torch.no_grad()
def embed(model: torch.nn.Module, images: Dataset, batch_size: int = 64, flip: bool = False,
          device=None, num_workers: int = 0) -> torch.Tensor:
    """Raw embeddings (N, D), float32 on the CPU, of every image of `images` (items `(x, label)`),
    with the model in eval mode (its mode is restored). flip=True adds the flipped image's embedding."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, _ in DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            x = x.to(device, non_blocking=True)
            e = model(x)
            if flip:
                e = e + model(x.flip(-1))
            out.append(e.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def pair_scores(emb: torch.Tensor, pairs: torch.Tensor) -> np.ndarray:
    """Cosine similarity of each pair's L2-normalised embeddings."""
    e = F.normalize(emb.double(), dim=1)
    return (e[pairs[:, 0]] * e[pairs[:, 1]]).sum(1).numpy()


def evaluate_pairset(model, pairset: PairSet, flip: bool = False, batch_size: int = 64, device=None,
                     num_workers: int = 0, nfolds: int = 10, fars=FARS) -> VerificationResult:
    """Embed a `PairSet`'s images once and compute its verification metrics."""
    emb = embed(model, pairset.images, batch_size, flip, device, num_workers)
    result = verification_metrics(pair_scores(emb, pairset.pairs), pairset.issame.numpy(), nfolds, fars)
    result.xnorm = float(emb.norm(dim=1).mean())
    return result


def evaluate_sets(model, pairsets: list[PairSet], **kwargs) -> dict[str, VerificationResult]:
    """{set name: result} for several evaluation sets (kwargs as `evaluate_pairset`)."""
    return {ps.name: evaluate_pairset(model, ps, **kwargs) for ps in pairsets}


def mean_accuracy(results: dict[str, VerificationResult]) -> float:
    """Model-selection metric: mean 10-fold accuracy over the evaluation sets (TVConv's `mean_val_acc`)."""
    if not results:
        raise ValueError("no evaluation sets: mean accuracy is undefined")
    return float(np.mean([r.acc for r in results.values()]))


def roc_image(fpr: np.ndarray, tpr: np.ndarray, size: int = 256) -> np.ndarray:
    """ROC curve drawn as a uint8 (size, size, 3) image for TensorBoard (`dataformats="HWC"`)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    pad = size // 16
    span = size - 1 - 2 * pad

    def xy(x, y):
        return pad + x * span, size - 1 - pad - y * span

    draw.rectangle([xy(0, 1), xy(1, 0)], outline=(0, 0, 0))
    draw.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))
    draw.line([xy(x, y) for x, y in zip(fpr, tpr)], fill=(200, 30, 30), width=2)
    return np.asarray(img)
