"""Helpers that run `train.py` as a user would, in a subprocess, with tiny settings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# a few-second run: a narrow small-input ResNet-50 on generated images (the model part is left out when the
# test picks its own model)
TINY_MODEL = ["model=resnet50", "model.width=0.125", "model.small_input=true"]
TINY = [
    "data=synthetic", "data.img_size=16", "data.train_size=256", "data.val_size=64", "data.batch_size=16",
    "data.workers=0", "trainer.progress=false", "trainer.count_flops=false",
]


def run_train(args, run_dir=None, env=None, check=True, launcher=None, timeout=600):
    """Run train.py (optionally under a launcher such as torchrun) and return the CompletedProcess."""
    own_model = any(a.startswith("model=") for a in args)
    cmd = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *([] if own_model else TINY_MODEL), *TINY, *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's TensorBoard events: tag → [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_text_tags(run_dir) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return acc.Tags()["tensors"]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture
def train():
    return run_train
