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


def run_train(args, run_dir=None, env=None, check=True, launcher=None, timeout=600, tiny=True, cwd=ROOT):
    """Run train.py (optionally under a launcher such as torchrun) and return the CompletedProcess.

    tiny=False runs exactly `args` (an experiment's own model and data are kept)."""
    own_model = any(a.startswith("model=") for a in args) or not tiny
    cmd = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *([] if own_model else TINY_MODEL),
           *(TINY if tiny else []), *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def compose_cfg(overrides, hydra_cfg=False):
    """The config `python train.py <overrides>` would run with (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from engine.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_cfg)


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
