"""Train a model: `python train.py [group=option ...] [key=value ...]`.

    python train.py                                   # ResNet-50 (small input) on Fashion-MNIST
    python train.py model=rednet op=involution        # RedNet-50
    python train.py -m optim.lr=0.1,0.05              # a sweep, one folder per run
    python train.py trainer.resume=true               # continue the latest run where it stopped
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel
    python train.py --help                            # the config groups and the composed config
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from engine.checkpoint import resolve_resume
from engine.config import register_configs
from engine.distributed import env_rank


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def prepare_argv(argv: list[str]) -> list[str]:
    """Rewrite the command line before Hydra composes it.

    - `trainer.resume=...` continues in the run's own folder, replaying that run's overrides
      (the new command line wins where both set a key), and names the checkpoint explicitly.
    - `-m`/`--multirun` may stand anywhere on the line (argparse wants it before the overrides).
    - torchrun ranks other than 0 get a throw-away Hydra folder: rank 0 picks the one run folder
      and hands it to them (otherwise every process resolves `${now:}` and makes its own).
    """
    args = list(argv[1:])
    multirun = any(a in ("-m", "--multirun") for a in args)
    if multirun:
        args = ["--multirun"] + [a for a in args if a not in ("-m", "--multirun")]
    resume = next((a.split("=", 1)[1] for a in args if _key(a) == "trainer.resume"), None)
    target = resolve_resume(resume) if resume is not None and not multirun else None
    if target is not None:
        run_dir, ckpt = target
        saved = run_dir / ".hydra" / "overrides.yaml"
        new_keys = {_key(a) for a in args if not a.startswith("-")}
        replay = [o for o in (yaml.safe_load(saved.read_text()) if saved.exists() else [])
                  if _key(o) not in new_keys | {"trainer.resume", "hydra.run.dir"}]
        args = replay + [a for a in args if _key(a) != "trainer.resume"]
        args += [f"trainer.resume={ckpt.resolve()}", f"hydra.run.dir={run_dir}"]
    if env_rank() != 0:
        args += [f"hydra.run.dir={tempfile.mkdtemp(prefix='dynconv-rank')}", "hydra.output_subdir=null",
                 "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [argv[0], *args]


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    from engine.trainer import fit  # heavy imports after Hydra has parsed the command line

    result = fit(cfg, Path(HydraConfig.get().runtime.output_dir))
    return result["best"]["metric"]


if __name__ == "__main__":
    register_configs()
    sys.argv = prepare_argv(sys.argv)
    main()
