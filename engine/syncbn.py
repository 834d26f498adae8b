"""Synchronised batch norm for every backend.

`nn.SyncBatchNorm` only runs on CUDA; on CPU (gloo) this module computes the batch statistics over
all processes with an autograd-aware all-reduce of (Σx, Σx², n), so the forward and the gradients
equal those of one process that sees the whole global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is again the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           xf.new_full((1,), x.numel() / c)])
        total = _AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias - mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """CUDA: torch's SyncBatchNorm. Other devices: every BatchNorm2d becomes an AllReduceBatchNorm2d."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats).to(next(child.buffers(), torch.empty(0)).device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device_type)
    return model

