"""What a checkpoint holds, written and read by one object: `RunState.state_dict()` is the checkpoint format,
`load_state_dict()` continues from it exactly."""
from __future__ import annotations

import copy

from . import checkpoint as ckpt_lib


def fresh_meters() -> dict:
    """The running sums of the current epoch."""
    return {"loss": 0.0, "correct": 0.0, "samples": 0, "steps": 0, "data_time": 0.0, "time": 0.0}


class RunState:
    """The stateful parts of a run (model, EMA weights, optimizer, scheduler, GradScaler; None where off) and the
    loop's progress: position, skipped steps, epoch meters, best, history, training wall time."""

    PROGRESS = ("epoch", "batch", "num_updates", "skipped", "meters", "best", "history", "wall_time")

    def __init__(self, model, optimizer, scheduler=None, scaler=None, ema=None, config: str = ""):
        self.parts = {"model": model, "ema": ema, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        self.config = config  # the run's config as YAML: `check_resumable` compares a new command with it
        self.epoch = self.batch = self.num_updates = self.skipped = 0
        self.meters = fresh_meters()
        self.best = {"metric": None, "epoch": None}
        self.history: list[dict] = []
        self.wall_time = 0.0

    def state_dict(self) -> dict:
        state = {name: part.state_dict() if part is not None else None for name, part in self.parts.items()}
        state.update({k: copy.deepcopy(getattr(self, k)) for k in self.PROGRESS})
        return {**state, "rng": ckpt_lib.rng_state(), "config": self.config}

    def load_state_dict(self, state: dict) -> None:
        """Restore every part and the progress. The RNG streams (`state["rng"]`) are left to the caller, to restore
        once nothing else will draw from them."""
        for name, part in self.parts.items():
            if part is not None and state.get(name) is not None:
                part.load_state_dict(state[name])
        if self.parts["ema"] is not None and state.get("ema") is None:  # EMA switched on at resume: from the weights
            self.parts["ema"].load_state_dict(self.parts["model"].state_dict())
        for k in self.PROGRESS:
            if k in state:  # `skipped` is newer than the first checkpoints
                setattr(self, k, copy.deepcopy(state[k]))
