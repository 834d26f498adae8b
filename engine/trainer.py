"""The training loop: build → (resume) → epochs of train steps and evaluation → checkpoints and logs.

Order of construction follows timm's train.py: seed, data, model (+ operator replacement), device
and memory format, SyncBN, optimizer, scheduler, resume, EMA, torch.compile, DDP.
"""
from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import io
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import data as data_lib
import dynconv
from dynconv.complexity import count_macs, format_macs
import models as models_lib
from . import checkpoint as ckpt_lib
from . import distributed, faults, preemption
from .sampler import EpochBatches, SeededItems
from .precise_bn import bn_layers, recompute_bn_stats
from .state import RunState, fresh_meters
from .syncbn import convert_sync_batchnorm
from . import face  # noqa: F401  (registers task=face)
from . import hparams
from .tasks import build_task

log = logging.getLogger("dynconv")


class NonFiniteLossError(dynconv.UserError, RuntimeError):
    """The training loss became NaN or inf; nothing of the diverged state was saved."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but CUDA is not available; use trainer.device=cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def compile_warning(model: nn.Module, device: torch.device) -> str | None:
    """What `trainer.compile` should tell the user about inductor on this model and device, or None."""
    from dynconv.ops.condconv import ExpertConv
    from dynconv.ops.odconv import ODConv

    experts = sorted({type(m).__name__ for m in model.modules() if isinstance(m, ExpertConv)
                      and not isinstance(m, ODConv)})
    if device.type != "cpu" or not experts:
        return None
    return (f"trainer.compile on CPU with {'/'.join(experts)} layers: inductor runs every convolution channels_last, "
            "which at batch 1 leaves these models 1.06-1.08x slower than eager (faster from batch 16 on; "
            "docs/BENCHMARKS.md); keep eager (trainer.compile=false) for batch-1 inference")


def schedule_warning(sched_cfg, epochs: int) -> str | None:
    """Why the schedule leaves little of the run at a useful lr, or None: warmup (rising from `warmup_lr`) and
    cooldown (timm appends it after `trainer.epochs`, at `min_lr`) together longer than the decay they frame."""
    s = sched_cfg
    if s.sched == "none" or s.warmup_epochs + s.cooldown_epochs <= epochs:
        return None
    return (f"sched.warmup_epochs={s.warmup_epochs} + sched.cooldown_epochs={s.cooldown_epochs} is longer than "
            f"trainer.epochs={epochs}: the run trains {epochs + s.cooldown_epochs} epochs, "
            f"{min(s.warmup_epochs, epochs)} warming up from {s.warmup_lr:g} and {s.cooldown_epochs} at "
            f"sched.min_lr={s.min_lr:g} after the schedule; shorten them or raise trainer.epochs")


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)         # torch.compile


def param_groups(model: nn.Module, weight_decay: float, filter_bias_and_bn: bool,
                 lr_mult: dict[str, float]) -> list[dict]:
    """Optimizer groups by (weight decay, lr multiplier): `lr_mult` maps parameter-name globs to multipliers
    (the first matching glob wins; e.g. `{"*rotation_conv*": 0.01}` for Deformable Kernels' offset convs);
    with `filter_bias_and_bn`, 1-D parameters and biases get no weight decay, as timm's default groups."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = filter_bias_and_bn and (p.ndim <= 1 or name.endswith(".bias"))
        scale = next((m for pattern, m in lr_mult.items() if fnmatch.fnmatchcase(name, pattern)), 1.0)
        group = groups.setdefault((no_decay, scale), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


def data_loader(dataset, cfg: DictConfig, dist, device: torch.device, *, shuffle: bool, limit: int | None,
                seed_offset: int = 0) -> DataLoader:
    """A DataLoader over this rank's share of `dataset` (`EpochBatches` is its `.batch_sampler`)."""
    d, seed = cfg.data, cfg.seed + seed_offset
    batches = EpochBatches(len(dataset), d.batch_size, shuffle=shuffle, drop_last=shuffle, seed=seed,
                           rank=dist.rank, world_size=dist.world_size, limit=limit)
    # a private generator: creating a loader iterator must not draw from the global
    # RNG streams, which a mid-epoch resume restores to their state at the checkpoint
    return DataLoader(SeededItems(dataset), batch_sampler=batches, num_workers=d.workers,
                      pin_memory=d.pin_memory and device.type == "cuda",
                      persistent_workers=d.persistent_workers and d.workers > 0,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=preemption.ignore_in_worker)


def eval_batches(cfg: DictConfig) -> int | None:
    """How many validation batches an evaluation takes (None: all)."""
    return 1 if cfg.trainer.dry_run else cfg.trainer.limit_val_batches


def build_network(cfg: DictConfig, task, info) -> tuple[nn.Module, nn.Module, list[dict]]:
    """The task's module around the configured backbone (operators replaced), the backbone, and the report."""
    to_dict = functools.partial(OmegaConf.to_container, resolve=True)
    num_classes = task.backbone_num_classes
    backbone, report = models_lib.build(to_dict(cfg.model), to_dict(cfg.op), to_dict(cfg.policy),
                                        num_classes=info.num_classes if num_classes is None else num_classes,
                                        in_chans=info.in_chans, input_size=tuple(info.input_size))
    return task.wrap(backbone), backbone, report


def autocast(trainer_cfg: DictConfig, device: torch.device):
    """Autocast in `trainer.amp_dtype` when `trainer.amp` (a context-manager factory)."""
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[trainer_cfg.amp_dtype]
    return functools.partial(torch.autocast, device.type, dtype=amp_dtype, enabled=trainer_cfg.amp)


class Run:
    """State of one training run, built by small builders in timm's order; `fit` drives it."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, t = cfg, cfg.trainer
        self._setup_process(run_dir)
        train_ds, val, self.info = data_lib.build_datasets(cfg.data)
        self._build_train_loaders(train_ds)
        to_dict = functools.partial(OmegaConf.to_container, resolve=True)
        self.task = build_task(to_dict(cfg.task), self.info)
        self.val = self.task.eval_data(val, functools.partial(self._loader, shuffle=False, limit=eval_batches(cfg)))
        self._build_model()
        self._build_optimizer()
        self._build_amp()
        self.ema = ModelEmaV3(unwrap(self.model), decay=t.model_ema_decay, use_warmup=t.model_ema_warmup) \
            if t.model_ema else None
        self.state = RunState(unwrap(self.model), self.optimizer, self.scheduler, self.scaler,
                              self.ema.module if self.ema is not None else None, OmegaConf.to_yaml(cfg))
        self.bad_update = False  # a micro-batch of the current update had a non-finite loss
        self.preemption = preemption.Listener()
        resume = ckpt_lib.resolve_resume(t.resume) \
            or preemption.requeued_checkpoint(self.run_dir, self.state.config)
        saved = ckpt_lib.load(resume[1]) if resume else None
        if saved is not None:
            self.state.load_state_dict(saved)
        self._wrap_model()
        if saved is not None:
            ckpt_lib.set_rng_state(saved["rng"])  # last: nothing above may draw from the restored streams
            log.info("resumed from %s at epoch %d, batch %d (update %d)", resume[1], self.state.epoch,
                     self.state.batch, self.state.num_updates)
        # everything logged at or before the checkpoint's step was written before it was saved;
        # later points of a killed run are purged from the curves
        self.writer = SummaryWriter(str(self.run_dir / "tb"),
                                    purge_step=self.state.num_updates + 1 if saved else None) if self.main else None

    # ------------------------------------------------------------------ builders
    def _setup_process(self, run_dir: Path) -> None:
        """Threads, device, process group, the one run folder (rank 0's), determinism and seeds."""
        t = self.cfg.trainer
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        self.dist = distributed.init(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.run_dir = Path(distributed.broadcast_object(str(run_dir), self.dist))
        self.ckpt_dir = self.run_dir / ckpt_lib.CKPT_DIR
        self.main = self.dist.is_main
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(self.cfg.seed + self.dist.rank)

    def _loader(self, dataset, *, shuffle: bool, limit: int | None, seed_offset: int = 0):
        return data_loader(dataset, self.cfg, self.dist, self.device, shuffle=shuffle, limit=limit,
                           seed_offset=seed_offset)

    def _build_train_loaders(self, train_ds) -> None:
        """The training stream, and the precise-BN one (its own sampler and seed: training draws are untouched)."""
        t = self.cfg.trainer
        self.train_loader = self._loader(train_ds, shuffle=True, limit=2 if t.dry_run else t.limit_train_batches)
        self.train_batches = self.train_loader.batch_sampler
        self.precise_bn_batches = min(t.precise_bn_batches, 1) if t.dry_run else t.precise_bn_batches
        self.bn_loader = self._loader(train_ds, shuffle=True, limit=self.precise_bn_batches, seed_offset=1) \
            if self.precise_bn_batches > 0 else None

    def _build_model(self) -> None:
        """Backbone (+ operator replacement) wrapped by the task, on the device; its size and MACs."""
        t, info = self.cfg.trainer, self.info
        model, backbone, self.report = build_network(self.cfg, self.task, info)
        model = model.to(self.device)
        if t.channels_last:  # the expert convs (CondConv, DY-Conv, ODConv) convert their 5-D kernels per expert
            model = model.to(memory_format=torch.channels_last)
        if t.sync_bn and self.dist.enabled:
            model = convert_sync_batchnorm(model, self.device.type)
        self.model = model
        self.param_count = sum(p.numel() for p in model.parameters())
        self.macs = count_macs(backbone, torch.zeros(1, info.in_chans, *info.input_size, device=self.device)) \
            if t.count_flops else None

    def _build_optimizer(self) -> None:
        """timm's optimizer (lr scaled by the global batch unless given) and scheduler (`trainer.epochs` long)."""
        o, s, t = self.cfg.optim, self.cfg.sched, self.cfg.trainer
        self.accum = t.grad_accum_steps
        lr = o.lr if o.lr is not None else \
            o.lr_base * self.cfg.data.batch_size * self.dist.world_size * self.accum / o.lr_base_size
        opt_kw = {}
        if o.opt_eps is not None:
            opt_kw["eps"] = o.opt_eps
        if o.opt_betas is not None:
            opt_kw["betas"] = tuple(o.opt_betas)
        if o.opt.lower() in ("sgd", "nesterov", "momentum"):
            opt_kw["nesterov"] = o.nesterov
        if o.lr_mult:  # groups carry timm's `lr_scale`, which its schedulers apply to every lr they set
            opt_kw["param_group_fn"] = functools.partial(param_groups, weight_decay=o.weight_decay,
                                                         filter_bias_and_bn=o.filter_bias_and_bn,
                                                         lr_mult=dict(o.lr_mult))
        self.optimizer = create_optimizer_v2(self.model, opt=o.opt, lr=lr, weight_decay=o.weight_decay,
                                             momentum=o.momentum, filter_bias_and_bn=o.filter_bias_and_bn, **opt_kw)
        self.scheduler, self.epochs = None, t.epochs
        if (warning := schedule_warning(s, t.epochs)) is not None and not t.dry_run:
            log.warning(warning)
        if s.sched != "none":
            self.scheduler, self.epochs = create_scheduler_v2(
                self.optimizer, sched=s.sched, num_epochs=t.epochs, decay_epochs=s.decay_epochs,
                decay_milestones=list(s.decay_milestones), cooldown_epochs=s.cooldown_epochs,
                decay_rate=s.decay_rate, min_lr=s.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs,
                warmup_prefix=s.warmup_prefix, step_on_epochs=s.step_on_epochs,
                updates_per_epoch=math.ceil(self.train_batches.num_batches() / self.accum))
            self.scheduler.step(0)  # the first step already sees each group's lr_scale (per-epoch schedules,
            self.scheduler.step_update(num_updates=0)  # then per-update ones: each call is a no-op for the other)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        if t.dry_run:
            self.epochs = 1

    def _build_amp(self) -> None:
        """Autocast in `trainer.amp_dtype`; float16 on CUDA also gets a GradScaler."""
        t = self.cfg.trainer
        self.autocast = autocast(t, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) \
            if t.amp and t.amp_dtype == "float16" and self.device.type == "cuda" else None

    def _wrap_model(self) -> None:
        """torch.compile, then DDP (after the weights are final: DDP broadcasts rank 0's)."""
        if self.cfg.trainer.compile:
            if (warning := compile_warning(self.model, self.device)) is not None:
                log.warning(warning)
            self.model = torch.compile(self.model)
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ helpers
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _scalar(self, tag: str, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, self.state.num_updates)

    def save(self) -> None:
        """Write `last.pt` (rank 0 only) with everything needed to continue exactly; never a non-finite state."""
        if not self.main:
            return
        bad = next((n for n, v in unwrap(self.model).state_dict().items()
                    if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            last = self.ckpt_dir / "last.pt"
            kept = f"{last} keeps the last finite state" if last.is_file() else "no checkpoint was written before"
            raise NonFiniteLossError(f"{bad} holds NaN/inf at step {self.state.num_updates} (lr {self.lr():.3g}); "
                                     f"{kept}: lower optim.lr or set optim.clip_grad")
        ckpt_lib.atomic_save(self.state.state_dict(), self.ckpt_dir / "last.pt")

    # ------------------------------------------------------------------ loop
    def train_epoch(self) -> None:
        t, m = self.cfg.trainer, self.state.meters
        self.model.train()
        self.train_batches.set_epoch(self.state.epoch, self.state.batch)
        accum_left = 0
        bar = tqdm(total=self.train_batches.num_batches(), initial=self.state.batch,
                   desc=f"epoch {self.state.epoch}", disable=not (self.main and t.progress), dynamic_ncols=True,
                   mininterval=1.0, leave=False)
        end = time.perf_counter()
        for x, y in self.train_loader:
            data_time = time.perf_counter() - end
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if accum_left == 0:
                accum_left = min(self.accum, self.train_batches.num_batches() - self.state.batch)
                micro_in_update = accum_left
            accum_left -= 1
            last_micro = accum_left == 0
            sync = contextlib.nullcontext() if last_micro or not self.dist.enabled else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss, correct = self.task.train_step(self.model, x, y, self.state.epoch)
                scaled = loss / micro_in_update
                # backward even on a bad loss: every DDP rank must finish the same reduction
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if self._nonfinite(loss):
                self._skip_bad_step(loss)
            else:
                m["loss"] += loss.item() * y.numel()
                m["correct"] += correct.item()
                m["samples"] += y.numel()
            m["data_time"] += data_time
            self.state.batch += 1
            if last_micro:
                self._optimizer_step()
                if self.state.num_updates % t.log_interval == 0 \
                        or self.state.batch == self.train_batches.num_batches():
                    step_loss = distributed.all_reduce_sum(loss.detach().float().cpu().reshape(1), self.dist)
                    self._scalar("train/loss", step_loss.item() / self.dist.world_size)
                    self._scalar("lr", self.lr())
                signum = self.preemption.agreed(self.dist)
                if signum is not None or t.ckpt_interval and self.state.num_updates % t.ckpt_interval == 0 \
                        and self.state.batch < self.train_batches.num_batches():
                    m["time"] += time.perf_counter() - end
                    end = time.perf_counter()
                    self.save()
                if signum is not None:
                    self._preempted(signum)
                faults.kill_point("update", self.state.num_updates)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.lr():.2e}", refresh=False)
            m["time"] += time.perf_counter() - end
            end = time.perf_counter()
        bar.close()

    def _precise_bn(self) -> None:
        """Recompute the BN statistics over `trainer.precise_bn_batches` training batches (engine/precise_bn.py)."""
        t = self.cfg.trainer
        self.bn_loader.batch_sampler.set_epoch(self.state.epoch)

        def prepare(x):
            x = x.to(self.device, non_blocking=True)
            return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

        used = recompute_bn_stats(unwrap(self.model), self.bn_loader, self.precise_bn_batches, prepare, self.autocast)
        if self.main:
            log.info("precise BN: statistics of %d layers recomputed over %d batches",
                     len(bn_layers(unwrap(self.model))), used)

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether any rank's loss of this micro-batch is NaN/inf (all ranks agree, so they skip or stop together)."""
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        return distributed.all_reduce_sum(flag, self.dist).item() > 0

    def _skip_bad_step(self, loss: torch.Tensor) -> None:
        """Drop this update (up to `trainer.skip_nonfinite` times in the run), else stop before anything is saved."""
        st, limit = self.state, self.cfg.trainer.skip_nonfinite
        where = f"step {st.num_updates} (epoch {st.epoch}, batch {st.batch}), lr {self.lr():.3g}, loss {loss.item()}"
        if st.skipped >= limit:
            raise NonFiniteLossError(
                f"non-finite loss at {where}; {st.skipped} bad step(s) skipped before (trainer.skip_nonfinite="
                f"{limit}). Nothing was saved from this state: lower optim.lr, set optim.clip_grad, or allow skips "
                "with trainer.skip_nonfinite=N")
        st.skipped += 1
        self.bad_update = True
        log.warning("non-finite loss at %s: update skipped (%d of trainer.skip_nonfinite=%d)", where, st.skipped, limit)

    def _optimizer_step(self) -> None:
        if self.bad_update:  # the GradScaler's way for a bad loss: no step, fresh gradients
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_update = False
            return
        clip = self.cfg.optim.clip_grad
        if self.scaler is not None and clip is not None:
            self.scaler.unscale_(self.optimizer)
        if clip is not None:
            dispatch_clip_grad(self.model.parameters(), clip, mode=self.cfg.optim.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.num_updates += 1
        self.state.meters["steps"] += 1
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=self.state.num_updates)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.state.num_updates)

    def end_epoch(self) -> dict:
        """Evaluate, log, checkpoint, and return this epoch's row of the history."""
        t, m = self.cfg.trainer, self.state.meters
        totals = distributed.all_reduce_sum(torch.tensor([m["loss"], m["correct"], m["samples"]],
                                                         dtype=torch.float64), self.dist)
        n = max(totals[2].item(), 1.0)
        row = {"epoch": self.state.epoch, "step": self.state.num_updates, "lr": self.lr(),
               "train_loss": totals[0].item() / n, "train_acc1": 100 * totals[1].item() / n,
               "img_per_s": totals[2].item() / max(m["time"], 1e-9), "epoch_time": m["time"],
               "data_time": m["data_time"] / max(m["steps"] * self.accum, 1)}
        last = self.state.epoch + 1 == self.epochs
        evaluate = (self.state.epoch + 1) % t.eval_interval == 0 or last
        if evaluate and self.bn_loader is not None:
            self._precise_bn()
        if t.dist_bn and self.dist.enabled:  # timm's --dist-bn: one set of BN statistics before evaluating/saving
            distribute_bn(self.model, self.dist.world_size, reduce=t.dist_bn == "reduce")
            if self.ema is not None:
                distribute_bn(self.ema.module, self.dist.world_size, reduce=t.dist_bn == "reduce")
        if evaluate:
            # evaluate the bare module: DDP's buffer broadcast would stall on ranks with fewer batches
            eval_model = self.model.module if self.dist.enabled else self.model
            val = self.task.evaluate(eval_model, self.val, self.device, self.autocast, self.dist, t.channels_last)
            row.update({f"val_{k}": v for k, v in val.items()})
            self._images(eval_model)
            if self.ema is not None:
                val = self.task.evaluate(self.ema.module, self.val, self.device, self.autocast, self.dist,
                                         t.channels_last)
                row.update({f"val_ema_{k}": v for k, v in val.items()})
        self._log_epoch(row)
        self.state.wall_time += m["time"]
        self.state.history.append(row)
        if self.scheduler is not None:
            self.scheduler.step(self.state.epoch + 1, row.get(f"val_{t.eval_metric}"))
        self.state.epoch, self.state.batch, self.state.meters = self.state.epoch + 1, 0, fresh_meters()
        key = f"val_ema_{t.eval_metric}" if self.ema is not None else f"val_{t.eval_metric}"
        improved = key in row and math.isfinite(row[key]) and (self.state.best["metric"] is None
                                                                or self._better(row[key], self.state.best["metric"]))
        if improved:
            self.state.best = {"metric": row[key], "epoch": row["epoch"], "key": key}
        self.save()
        if improved and self.main:
            ckpt_lib.atomic_copy(self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt")
        self._write_tables()
        return row

    def _images(self, model) -> None:
        """Images a task shows in TensorBoard (face: ROC curves, TVConv affinity maps and filters)."""
        if self.writer is not None and hasattr(self.task, "images"):
            for tag, img in self.task.images(model).items():
                self.writer.add_image(tag, img, self.state.num_updates, dataformats="HWC")

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.cfg.trainer.eval_metric == "loss" else a > b

    def _log_epoch(self, row: dict) -> None:
        for k, v in row.items():
            if k.startswith("val_ema_"):
                self._scalar(f"val_ema/{k[8:]}", v)
            elif k.startswith("val_"):
                self._scalar(f"val/{k[4:]}", v)
        self._scalar("train/acc1", row["train_acc1"])
        self._scalar("train/loss_epoch", row["train_loss"])
        self._scalar("perf/img_per_s", row["img_per_s"])
        self._scalar("perf/epoch_time", row["epoch_time"])
        self._scalar("perf/data_time", row["data_time"])
        self._scalar("epoch", row["epoch"])
        if self.writer is not None:
            self.writer.flush()
        if self.main:
            log.info("epoch %d: %s", row["epoch"],
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch",)))

    def _write_tables(self) -> None:
        """metrics.csv and summary.json, rewritten whole from the history (no duplicate rows after resume)."""
        if not self.main:
            return
        keys = list(dict.fromkeys(k for row in self.state.history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.state.history)
        _atomic_text(self.run_dir / "metrics.csv", buf.getvalue())
        final = self.state.history[-1] if self.state.history else {}
        summary = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "epochs_done": self.state.epoch, "total_epochs": self.epochs, "num_updates": self.state.num_updates,
            "final": final, "best": self.state.best,
            "params": self.param_count, **self._macs_summary(),
            "wall_time_s": self.state.wall_time, "img_per_s": _train_speed(self.state.history),
            "replacement": len(self.report),
        }
        _atomic_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))

    def _macs_summary(self) -> dict:
        """summary.json's MACs: the training form per image and, apart, the inference form's (dynconv.complexity)."""
        m = self.macs or {}
        return {"macs_per_image": m.get("macs"), "macs_inference_per_image": m.get("inference_macs"),
                "macs_inference_once": m.get("precomputed_macs")}

    def start_logging(self) -> None:
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg_yaml = OmegaConf.to_yaml(self.cfg)
        self.writer.add_text("config", "```yaml\n" + cfg_yaml + "\n```", self.state.num_updates)
        _atomic_text(self.run_dir / "replacement.json", json.dumps(self.report, indent=2, default=str))
        log.info("run folder: %s", self.run_dir)
        kept = sum(r["skipped"] for r in self.report)
        log.info("model: %s params, %s; %d layers replaced%s; device %s, world size %d",
                 f"{self.param_count:,}", format_macs(self.macs) if self.macs is not None else "n/a MACs/image",
                 len(self.report) - kept, f" ({kept} kept their conv)" if kept else "", self.device,
                 self.dist.world_size)

    def fit(self) -> dict:
        self.start_logging()
        started = time.perf_counter()
        try:
            while self.state.epoch < self.epochs:
                self._anneal()
                self.train_epoch()
                self.end_epoch()
                if (signum := self.preemption.agreed(self.dist)) is not None:  # end_epoch saved this state
                    self._preempted(signum)
            hparams.write(self.writer, self.cfg, self.run_dir, self.state.history)
        finally:
            if self.writer is not None:
                self.writer.close()
        if self.main:
            log.info(self._finished(time.perf_counter() - started))
        return {"best": self.state.best, "final": self.state.history[-1] if self.state.history else {},
                "run_dir": str(self.run_dir)}

    def _preempted(self, signum: int) -> None:
        """`last.pt` holds this step: log one line and exit to the launcher (engine/preemption.py)."""
        if self.main:
            st = self.state
            log.warning("%s: stopped after update %d (epoch %d, batch %d); %s saved %.1f s after the signal. "
                        "Continue with trainer.resume=%s (a submitit job continues by itself when requeued)",
                        signal.Signals(signum).name, st.num_updates, st.epoch, st.batch, self.ckpt_dir / "last.pt",
                        time.monotonic() - self.preemption.received_at, self.run_dir)
        self.preemption.hand_over(signum)

    def _finished(self, seconds: float) -> str:
        """The run's last log line, e.g. "finished: 2 epochs, 6.8 min of training and evaluation in this process,
        310 train img/s; val_acc1 85.40 at the end, best 85.40 (epoch 1)" (a resumed run counts its own part)."""
        history, best = self.state.history, self.state.best
        speed = _train_speed(history)
        line = (f"finished: {self.state.epoch} epochs, {seconds / 60:.1f} min of training and evaluation in this "
                f"process, {float('nan') if speed is None else speed:.0f} train img/s")
        if best.get("key"):
            final = history[-1].get(best["key"], float("nan"))
            if self.ema is not None:  # best.pt is chosen by the EMA's metric: say so, and give the raw weights' too
                line += "; EMA weights (trainer.model_ema=true; they pick best.pt, its `ema` entry)"
            line += f"; {best['key']} {final:.2f} at the end, best {best['metric']:.2f} (epoch {best['epoch']})"
            if self.ema is not None:
                raw = f"val_{self.cfg.trainer.eval_metric}"
                line += f"; raw weights: {raw} {history[-1].get(raw, float('nan')):.2f} at the end"
        return line

    def _anneal(self) -> None:
        """The operators' per-epoch schedules (DY-Conv/ODConv: attention temperature 30 → 1 over 10 epochs)."""
        if self.cfg.trainer.anneal_temperature:
            dynconv.on_epoch_start(unwrap(self.model), self.state.epoch)


def _train_speed(history: list[dict]) -> float | None:
    """Training images per second over every epoch of `history` (None before the first)."""
    train_time = sum(r["epoch_time"] for r in history)
    return sum(r["img_per_s"] * r["epoch_time"] for r in history) / train_time if train_time else None


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fit(cfg: DictConfig, run_dir: Path) -> dict:
    run = Run(cfg, run_dir)
    try:
        with run.preemption:  # SIGTERM / submitit's signal: save this step and exit (engine/preemption.py)
            return run.fit()
    finally:
        distributed.shutdown()
