"""What is trained and how it is scored: image classification (and, in `engine.face`, face recognition).

A task owns its loss settings and its evaluation data. It turns the backbone into the module that is
optimised (`wrap`), computes the training loss of a batch (`train_step`), makes the evaluation data from
the dataset's validation part (`eval_data`) and evaluates on it (`evaluate`). The trainer owns the rest.
"""
from __future__ import annotations

import difflib
import inspect
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from data.config import NON_NEGATIVE, PROBABILITY, ConfigError, check_ranges
from . import distributed

TASKS: dict[str, type] = {}


def register_task(name: str):
    def deco(cls):
        TASKS[name] = cls
        return cls
    return deco


def build_task(task_cfg: dict, info):
    """The task `task_cfg["name"]` built with the other keys as its options (a misspelt key is named)."""
    name = task_cfg.get("name", "classification")
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    opts = {k: v for k, v in task_cfg.items() if k != "name"}
    valid = [k for k, p in inspect.signature(TASKS[name]).parameters.items() if p.kind is p.KEYWORD_ONLY]
    for key in opts.keys() - set(valid):
        near = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean task.{near[0]}?" if near else f"task={name} takes: {', '.join(valid)}"
        raise ConfigError(f"unknown config key 'task.{key}'; {hint}")
    return TASKS[name](info, **opts)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


@register_task("classification")
class ClassificationTask:
    """Cross-entropy with label smoothing, optional mixup/cutmix; top-1/top-5 evaluation."""

    backbone_num_classes = None  # the backbone's classifier has one output per class of the data

    def __init__(self, info, *, smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0,
                 mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5, mixup_off_epoch: int = 0,
                 mixup_ramp_epochs: int = 0):
        """`smoothing`: label smoothing; `mixup`/`cutmix`: alphas (0: off), applied with `mixup_prob`, cutmix
        instead of mixup with `mixup_switch_prob`; mixing stops at `mixup_off_epoch` (0: never) and its alpha ramps
        linearly from 0 over `mixup_ramp_epochs` (DCD's recipe; 0: no ramp)."""
        check_ranges(SimpleNamespace(**locals()), "task", dict(
            smoothing=(lambda v: 0 <= v < 1, "in [0, 1)"), mixup=NON_NEGATIVE, cutmix=NON_NEGATIVE,
            mixup_prob=PROBABILITY, mixup_switch_prob=PROBABILITY, mixup_off_epoch=NON_NEGATIVE,
            mixup_ramp_epochs=NON_NEGATIVE))
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, label_smoothing=smoothing,
                               num_classes=info.num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        self.mixup_off_epoch, self.mixup_alpha, self.mixup_ramp = mixup_off_epoch, mixup, mixup_ramp_epochs

    def eval_data(self, val, make_loader):
        """The validation Dataset in batches (`make_loader(dataset)`: this rank's share)."""
        return make_loader(val)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def train_step(self, model, x, y, epoch: int):
        """Loss and number of top-1 hits (against the un-mixed labels) of one batch."""
        target = y
        if self.mixup is not None:
            # DCD's ramp: alpha = mixup · epoch / ramp for the first `ramp` epochs (alpha 0 at epoch 0: no mixing)
            alpha = self.mixup_alpha * min(1.0, epoch / self.mixup_ramp) if self.mixup_ramp else self.mixup_alpha
            self.mixup.mixup_alpha = alpha
            self.mixup.mixup_enabled = (not (self.mixup_off_epoch and epoch >= self.mixup_off_epoch)
                                        and (alpha > 0 or self.mixup.cutmix_alpha > 0))
            x, target = self.mixup(x, y)
        logits = model(x)
        loss = self.train_loss(logits, target)
        return loss, (logits.detach().argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast, dist_info, channels_last=False) -> dict:
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(x)
            top1, top5 = topk_correct(logits.float(), y)
            sums += torch.tensor([F.cross_entropy(logits.float(), y, reduction="sum").item(),
                                  top1.item(), top5.item(), y.numel()], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums, dist_info)
        n = max(sums[3].item(), 1.0)
        return {"loss": sums[0].item() / n, "acc1": 100 * sums[1].item() / n, "acc5": 100 * sums[2].item() / n}

