"""A run's hyperparameters through TensorBoard's HParams plugin, so a sweep reads as one table.

Each run logs the keys its command line overrode (dict values flattened to their leaves), the option chosen in each
config group, the commit of the code, and, as metrics, the final value of every `val/*` and `train/*` scalar it
logged: `tensorboard --logdir multirun/<sweep>` then shows the sweep's runs as rows and as parallel coordinates.
The same record is written to `hparams.json` in the run folder.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams as hparams_summary

GROUPS = ("model", "op", "policy", "data", "optim", "sched", "trainer", "task", "experiment", "cell", "debug")
SKIPPED = ("hydra.", "trainer.resume")  # launcher settings and the resume target say nothing about the run
ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The code's git commit (with `-dirty` for uncommitted changes), or `unknown` outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _hydra_choices_and_overrides() -> tuple[dict, list[str]]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # fit() called from Python rather than through train.py
        return {}, []
    hc = HydraConfig.get()
    return dict(hc.runtime.choices), list(hc.overrides.task)


def _leaves(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _leaves(f"{prefix}.{key}", sub).items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {prefix: "null" if value is None else value}
    return {prefix: json.dumps(value)}  # lists: HParams takes only scalars and strings


def collect(cfg: DictConfig, choices: dict, overrides: list[str]) -> dict:
    """Group choices as `choice/<group>`, then every overridden key with its resolved value, then the commit."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = {f"choice/{g}": str(choices[g]).replace("None", "null") for g in GROUPS if g in choices}
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        # a group choice (`op=ddf`) is listed above; a value merged into a group (`++op={name:ddf}`) is not
        if key.startswith(SKIPPED) or o.is_delete() or (key in choices and isinstance(o.value(), str)):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        out.update(_leaves(key, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value))
    out["commit"] = commit()
    return out


def final_metrics(history: list[dict]) -> dict[str, float]:
    """The last value of each metric the history logged, under its TensorBoard tag (`val_acc1` → `val/acc1`)."""
    out = {}
    for row in history:
        for k, v in row.items():
            for prefix in ("val_ema_", "val_", "train_"):
                if k.startswith(prefix) and isinstance(v, (int, float)):
                    out[f"{prefix[:-1]}/{k[len(prefix):]}"] = float(v)
                    break
    return out


def write(writer, cfg: DictConfig, run_dir: Path, history: list[dict]) -> dict:
    """Log the run's hparams (rank 0 passes its SummaryWriter; others pass None) and write `hparams.json`."""
    if writer is None:
        return {}
    choices, overrides = _hydra_choices_and_overrides()
    hp, metrics = collect(cfg, choices, overrides), final_metrics(history)
    # the metrics name scalars the run already logged: the plugin shows each tag's last value
    for summary in hparams_summary(hp, metrics):
        writer.file_writer.add_summary(summary)
    writer.flush()
    record = {"hparams": hp, "metrics": metrics}
    (Path(run_dir) / "hparams.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
