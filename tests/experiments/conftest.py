"""Shared helpers of the experiment tests: the experiment files, their sweep cells, composing a config."""
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from engine.config import register_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
ABLATIONS = [e for e in EXPERIMENTS if e.startswith("ablation_")]
RECIPES = ["rednet50_imagenet", "ddf_resnet50_imagenet", "dcd_resnet50_imagenet", "dcd_mobilenetv2_imagenet"]


def compose_cfg(overrides, hydra_cfg=False):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_cfg)


def sweep_params(experiment: str) -> dict[str, str]:
    """`hydra.sweeper.params` of an experiment file, as written (key → comma-separated choices)."""
    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    return dict(yaml.safe_load(text)["hydra"]["sweeper"]["params"])


def choices(key: str, value: str) -> list[str]:
    """The override strings of one sweep parameter: `key=choice` for every choice, parsed as Hydra parses them."""
    override = OverridesParser.create().parse_override(f"{key}={value}")
    return [f"{key}={choice}" for choice in override.sweep_string_iterator()]


def train_py(args, timeout=900):
    """Run train.py with exactly `args` (tests/engine/conftest.py's run_train always adds its tiny model and
    generated data, which would replace a suite's own)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(CONFIGS.parent / "train.py"), *args], cwd=CONFIGS.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
