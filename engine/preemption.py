"""Preemption: SIGTERM, or the signal a submitit launcher asks SLURM to send before the time limit, ends training
after the optimizer step in flight with a checkpoint of that step, then hands the job back to its launcher.

The handler only records the signal: the loop looks at it after each optimizer step (and after each epoch end),
every rank agrees through one reduction, rank 0 saves `last.pt` atomically, and the run exits. A second signal
during the save only records itself again, so it cannot tear the file.

Under submitit (facebookincubator/submitit, `submitit/core/job_environment.py`) the job process binds the
preemption signal (`SUBMITIT_PREEMPT_SIGNAL`, USR2 by default; the SLURM launcher asks for it `signal_delay_s`
before the time limit) to checkpoint-and-requeue, and only logs SIGTERM. After the save, the signal goes on to
that handler: USR2 requeues the job with its original arguments (hydra-submitit-launcher's `checkpoint`), SIGTERM
ends it as submitit would. The requeued job finds `last.pt` of the same config in its run folder and continues
from it (`requeued_checkpoint`).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt_lib
from . import distributed
from .config import ConfigError

log = logging.getLogger("dynconv")


def watched_signals() -> list[signal.Signals]:
    """SIGTERM and submitit's preemption signal (USR2 unless `SUBMITIT_PREEMPT_SIGNAL` names another)."""
    usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    return list(dict.fromkeys(s for s in (signal.SIGTERM, usr) if s is not None))


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers leave the watched signals to the main process. A cluster signals every
    process of a job, and torch's own SIGTERM handler in a worker ends it, which fails the loader mid-save; the
    loader still stops its workers through its done event, and a worker exits when the main process does."""
    for s in watched_signals():
        signal.signal(s, signal.SIG_IGN)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with the usual status of a signal, 128 + signum."""


class Listener:
    """Records the watched signals while installed (a context manager; main thread only, as Python requires)."""

    def __init__(self):
        self.signum: int | None = None
        self.received_at = 0.0
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    def __enter__(self) -> "Listener":
        if threading.current_thread() is threading.main_thread():
            for s in watched_signals():
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, dist: distributed.DistInfo) -> int | None:
        """The signal, if any rank received one; every rank gets the same answer, so all stop at the same step
        (submitit's signal wins over SIGTERM when ranks received different ones)."""
        if dist.enabled:
            watched = watched_signals()
            got = distributed.all_reduce_sum(torch.tensor([float(self.signum == s) for s in watched]), dist)
            received = [s for s, n in zip(watched, got.tolist()) if n > 0]
            if received and self.signum != received[-1]:
                self.signum, self.received_at = received[-1], self.received_at or time.monotonic()
        return self.signum

    def hand_over(self, signum: int) -> None:
        """After the save: the handler the job had for this signal (submitit's requeue) runs, then the run exits."""
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous):
            previous(signum, None)
        raise Preempted(128 + signum)


def requeued_checkpoint(run_dir: Path, config_yaml: str) -> tuple[Path, Path] | None:
    """(run folder, last.pt) when a submitit job starts in a run folder that already holds a checkpoint of this
    very config, i.e. the job was requeued after preemption; None outside submitit or in a fresh folder."""
    ckpt = Path(run_dir) / ckpt_lib.CKPT_DIR / "last.pt"
    if "SUBMITIT_EXECUTOR" not in os.environ or not ckpt.is_file():
        return None
    if ckpt_lib.load(ckpt, mmap=True)["config"] != config_yaml:
        raise ConfigError(f"{ckpt} belongs to a run of another config; a submitit job continues only its own run. "
                          "Give this sweep its own folder (hydra.sweep.dir=...)")
    return Path(run_dir), ckpt
