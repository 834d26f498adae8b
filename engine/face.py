"""Face recognition task (`task=face`): backbone embedding → margin head (CosFace/ArcFace), scored by
verification on held-out identities (10-fold accuracy, TAR@FAR, ROC AUC), TVConv's recipe."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynconv
from data.config import ConfigError
from models.face_heads import build_head
from .tasks import register_task
from .verification import evaluate_sets, mean_accuracy, roc_image


class FaceModel(nn.Module):
    """The trained module: `forward(x, labels)` gives margin logits; `backbone(x)` the embedding."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(x), labels)


@register_task("face")
class FaceTask:
    backbone_num_classes = 0  # the backbone returns its embedding (timm's num_classes=0: features)

    def __init__(self, info, *, margin: dict | None = None, flip_test: bool = False, eval_batch_size: int = 64):
        """`margin`: the margin head's options (configs/margin/); `flip_test`: embed each image and its mirror."""
        if not margin:
            raise ConfigError("task=face needs a margin head: margin=cosface or margin=arcface")
        self.margin_cfg, self.info = dict(margin), info
        self.flip_test, self.eval_batch_size = flip_test, eval_batch_size
        self.last_results = {}

    def eval_data(self, val, make_loader):
        """The verification PairSets as they are: `evaluate` embeds them in its own batches."""
        return val

    def wrap(self, backbone: nn.Module) -> nn.Module:
        was_training = backbone.training
        with torch.no_grad():
            dim = backbone.eval()(torch.zeros(1, self.info.in_chans, *self.info.input_size)).shape[1]
        backbone.train(was_training)
        head = build_head(**self.margin_cfg, embedding_size=dim, num_classes=self.info.num_classes)
        return FaceModel(backbone, head)

    def train_step(self, model, x, y, epoch: int):
        logits = model(x, y)
        loss = F.cross_entropy(logits.float(), y)
        return loss, (logits.detach().argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self, model, pairsets, device, autocast, dist_info, channels_last=False) -> dict:
        with autocast():
            results = evaluate_sets(model.backbone, pairsets, flip=self.flip_test, batch_size=self.eval_batch_size,
                                    device=device)
        self.last_results = results
        out = {"mean_acc": 100 * mean_accuracy(results)}
        for name, r in results.items():
            out.update({f"{name}/{k}": (100 * v if k.startswith(("acc", "tar")) else v)
                        for k, v in r.scalars().items()})
        return out

    def images(self, model) -> dict[str, np.ndarray]:
        """ROC curves of the last evaluation, and the operators' images (TVConv: affinity maps, filters)."""
        out = {f"roc/{name}": roc_image(r.fpr, r.tpr) for name, r in self.last_results.items()}
        out.update(dynconv.tensorboard_images(model))
        return out

