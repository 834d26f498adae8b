"""Shared helpers of the experiment tests: the experiment files, their sweep cells, composing a config."""
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.engine.conftest import compose_cfg, run_train  # noqa: F401  (compose_cfg is shared with the tests here)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
ABLATIONS = [e for e in EXPERIMENTS if e.startswith("ablation_") and not e.endswith("_full")]
RECIPES = ["rednet50_imagenet", "ddf_resnet50_imagenet", "dcd_resnet50_imagenet", "dcd_mobilenetv2_imagenet"]


def sweep_params(experiment: str) -> dict[str, str]:
    """`hydra.sweeper.params` of an experiment file, as written (key → comma-separated choices)."""
    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    return dict(yaml.safe_load(text)["hydra"]["sweeper"]["params"])


def choices(key: str, value: str) -> list[str]:
    """The override strings of one sweep parameter: `key=choice` for every choice, parsed as Hydra parses them."""
    override = OverridesParser.create().parse_override(f"{key}={value}")
    return [f"{key}={choice}" for choice in override.sweep_string_iterator()]


def train_py(args, timeout=900):
    """Run train.py with exactly `args`: the suite's own model and data."""
    return run_train(args, timeout=timeout, tiny=False)
