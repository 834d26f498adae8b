"""Evaluate a checkpoint on its validation data: top-1, top-5 and loss (face: verification accuracy and threshold
of each evaluation set), with the trainer's own evaluation (the top-1 a run logged is the top-1 printed here).

    python scripts/validate.py checkpoint=outputs/train/<run>/checkpoints/best.pt       # the run's own config
    python scripts/validate.py checkpoint=<run>/checkpoints/best.pt use_ema=true          # its EMA weights
    python scripts/validate.py checkpoint=<run>/checkpoints/last.pt data.root=/data/copy  # a key set on top
    python scripts/validate.py checkpoint=rednet50.pth model=rednet50 data=imagefolder data.root=/data/imagenet
    python scripts/validate.py -m checkpoint=a.pt,b.pt results_file=results.json         # several checkpoints

The config is composed by Hydra from train.py's groups (configs/validate.yaml). An official state_dict (RedNet,
DDF-ResNet, DCD, TVConv keys) is converted by `models.load_official` into the network `model=` names.
`results_file` gets JSON: `acc1`, `acc5`, `loss` (face: `mean_acc` and one entry per set); with `-m`, a list
with one such object per checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, register_configs, validate as validate_config  # noqa: E402
from engine.inference import Checkpoint, Loaded, ValidateConfig  # noqa: E402


def validate(cfg: DictConfig, overrides: list[str], compose) -> dict:
    """The metrics of `cfg.checkpoint` (`overrides`: the command line; `compose(overrides)`: its config)."""
    ckpt = Checkpoint(cfg.checkpoint)
    run_cfg = ckpt.config(cfg, overrides, compose)
    validate_config(run_cfg)
    loaded = Loaded(run_cfg, ckpt, cfg.use_ema)
    eval_data = loaded.eval_data()
    metrics = loaded.evaluate(tqdm(eval_data, desc=f"validate {Path(cfg.checkpoint).name}", dynamic_ncols=True,
                                   leave=False, unit="set" if loaded.is_face else "batch"))
    results = {"checkpoint": str(cfg.checkpoint), "use_ema": bool(cfg.use_ema)}
    if not loaded.is_face:
        return {**results, **{k: metrics[k] for k in ("acc1", "acc5", "loss")}}
    sets = {}
    for key, value in metrics.items():
        name, _, metric = key.rpartition("/")
        if name:
            sets.setdefault(name, {})[metric] = value
    for name, result in loaded.task.last_results.items():  # each fold's threshold is fitted on the other folds
        sets[name]["threshold"] = float(np.mean(result.thresholds))
    return {**results, "mean_acc": metrics["mean_acc"], "sets": sets}


def report(results: dict) -> str:
    ckpt = results["checkpoint"] + (" (EMA)" if results["use_ema"] else "")
    if "sets" not in results:
        return f"{ckpt}: acc1 {results['acc1']:.3f} acc5 {results['acc5']:.3f} loss {results['loss']:.4f}"
    lines = [f"{ckpt}: mean verification accuracy {results['mean_acc']:.3f}"]
    lines += [f"  {name}: acc {r['acc']:.3f} ± {r['acc_std']:.3f}, threshold (cosine) {r['threshold']:.4f}"
              for name, r in results["sets"].items()]
    return "\n".join(lines)


def write_results(path: str, results: dict, append: bool) -> None:
    """`results` as JSON; `append` (the later jobs of a -m sweep): added to the file's list."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    if append:
        previous = json.loads(file.read_text()) if file.is_file() else []
        results = [*(previous if isinstance(previous, list) else [previous]), results]
    file.write_text(json.dumps(results, indent=2) + "\n")


def _compose(overrides: list[str]) -> DictConfig:
    return hydra.compose(config_name="validate", overrides=overrides)


@hydra.main(version_base="1.3", config_path="../configs", config_name="validate")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    try:
        results = validate(cfg, list(hc.overrides.task), _compose)
    except MissingMandatoryValue as e:
        sys.exit(f"validate.py: error: {e.full_key}= is required: python scripts/validate.py checkpoint=<best.pt, last.pt or official state_dict>")
    except (ConfigError, OSError, ValueError) as e:
        sys.exit(f"validate.py: error: {e}")
    print(report(results), flush=True)
    if cfg.results_file:
        multirun = hc.mode == RunMode.MULTIRUN
        write_results(cfg.results_file, [results] if multirun and hc.job.num == 0 else results,
                      append=multirun and hc.job.num > 0)


if __name__ == "__main__":
    register_configs(ValidateConfig)
    main()
