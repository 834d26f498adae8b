"""Train a model: `python train.py [group=option ...] [key=value ...]`.

    python train.py                                   # ResNet-50 (small input) on Fashion-MNIST
    python train.py model=rednet op=involution        # RedNet-50
    python train.py -m optim.lr=0.1,0.05              # a sweep, one folder per run
    python train.py trainer.resume=true               # continue the latest run where it stopped
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel
    python train.py --help                            # the config groups and the composed config
"""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dynconv.errors import UserError
from engine.checkpoint import check_resumable, resolve_resume
from engine.config import CONFIG_DIR, override_key, register_configs, replayable_overrides, validate
from engine.distributed import env_rank

RANK_DIR_PREFIX = "dynconv-rank"


def compose(overrides: list[str]) -> DictConfig:
    """The config these overrides give, composed without running a job (nothing is written)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=[o for o in overrides if not override_key(o).startswith("hydra")])


def resume_args(args: list[str], run_dir: Path, ckpt: Path) -> list[str]:
    """Replay the run's checked overrides under the new command line (which wins where both set a key), then
    refuse a config that cannot continue this checkpoint before Hydra rewrites anything in the folder."""
    new_keys = {override_key(a) for a in args if not a.startswith("-")}
    replay = [o for o in replayable_overrides(run_dir / ".hydra" / "overrides.yaml")
              if override_key(o) not in new_keys | {"trainer.resume", "hydra.run.dir"}]
    args = replay + [a for a in args if override_key(a) != "trainer.resume"]
    cfg = compose([a for a in args if not a.startswith("-")])
    validate(cfg)
    check_resumable(ckpt, cfg)
    return args + [f"trainer.resume={ckpt.resolve()}", f"hydra.run.dir={run_dir}"]


def prepare_argv(argv: list[str]) -> list[str]:
    """Rewrite the command line before Hydra composes it.

    - `trainer.resume=...` continues in the run's own folder, replaying that run's overrides
      (only config groups and schema keys; the new command line wins where both set a key), and names
      the checkpoint explicitly.
    - `-m`/`--multirun` may stand anywhere on the line (argparse wants it before the overrides).
    - torchrun ranks other than 0 get a throw-away Hydra folder: rank 0 picks the one run folder
      and hands it to them (otherwise every process resolves `${now:}` and makes its own).
    """
    args = list(argv[1:])
    multirun = any(a in ("-m", "--multirun") for a in args)
    if multirun:
        args = ["--multirun"] + [a for a in args if a not in ("-m", "--multirun")]
    resume = next((a.split("=", 1)[1] for a in args if override_key(a) == "trainer.resume"), None)
    target = resolve_resume(resume) if resume is not None and not multirun else None
    if target is not None:
        args = resume_args(args, *target)
    if env_rank() != 0:  # main() removes this folder again
        args += [f"hydra.run.dir={tempfile.mkdtemp(prefix=RANK_DIR_PREFIX)}", "hydra.output_subdir=null",
                 "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [argv[0], *args]


def _log_to_file(message: str) -> None:
    """Record `message` in the run's train.log only (the console gets the one-line error instead)."""
    record = logging.LogRecord("dynconv", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        from engine.trainer import fit  # heavy imports after Hydra has parsed the command line

        result = fit(cfg, out)
    except UserError as e:  # bad input, not a bug: one line, no traceback (a sweep reports it per run)
        message = " ".join(str(e).split())
        _log_to_file(f"stopped: {message}")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(f"train.py: error: {message}")
    finally:
        if env_rank() != 0 and out.name.startswith(RANK_DIR_PREFIX):
            shutil.rmtree(out, ignore_errors=True)
    return result["best"]["metric"]


if __name__ == "__main__":
    register_configs()
    try:
        sys.argv = prepare_argv(sys.argv)
    except (UserError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    main()
