"""torchrun integration: process group setup (NCCL on CUDA, gloo on CPU), rank helpers, reductions.

A job of Hydra's submitit launcher with several tasks (one per GPU) takes the same path: its ranks are exported as
torchrun's environment variables first."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """The process rank torchrun gave us (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def _adopt_submitit_tasks() -> None:
    """Under submitit (SLURM or local) with several tasks, set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from
    the job's environment, as torchrun would (every GPU stays visible: the trainer picks cuda:LOCAL_RANK)."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)


def init(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun or as a multi-task submitit job; a no-op otherwise."""
    _adopt_submitit_tasks()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """`t` summed over the ranks, on `t`'s device; NCCL reduces CUDA tensors only, so CPU ones go through the GPU."""
    if not info.enabled:
        return t
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(on, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
