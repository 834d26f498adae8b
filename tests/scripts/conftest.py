"""Helpers of the script tests: every script's `--help`; the validate/predict configs composed in-process, and
train.py-format checkpoints written without training (a freshly built network and the run's config, as
`RunState.state_dict` saves them)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from engine.config import register_configs
from engine.inference import PredictConfig, ValidateConfig
from engine.tasks import build_task
from engine.trainer import build_network
from tests.engine.conftest import ROOT, TINY, TINY_MODEL, compose_cfg

SCHEMAS = {"validate": ValidateConfig, "predict": PredictConfig}
HELP_DRIVER = """
import contextlib, io, os, runpy, sys
from hydra.core.global_hydra import GlobalHydra
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python <script>` does
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:
        code = f"{type(e).__name__}: {e}"
    sys.path.pop(0)
    GlobalHydra.instance().clear()
    print(f"help-exit {script} {code if code or out.getvalue().strip() else 'printed nothing'!r}", flush=True)
"""


def help_exits(scripts: list[str]) -> dict[str, int | str]:
    """`<script> --help` of each repository-relative path: 0 where it exits 0 having printed its help, otherwise the
    exit code or what went wrong. The Python scripts run in one interpreter (the imports are shared), `bash` the rest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    python = [s for s in scripts if s.endswith(".py")]
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, *python], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    exits = dict(line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("help-exit "))
    out = {s: ast.literal_eval(exits[s]) if s in exits else proc.stderr[-3000:] for s in python}
    for script in set(scripts) - set(python):
        shell = subprocess.run(["bash", script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        out[script] = shell.returncode if shell.returncode or shell.stdout.strip() else "printed nothing"
    return out


@pytest.fixture
def script_config():
    """`script_config(name, overrides)`: the config `python scripts/<name>.py <overrides>` runs with, and its
    compose function; train.py's schema is restored afterwards."""
    def make(name, overrides):
        register_configs(SCHEMAS[name])
        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
        return compose(name, overrides=overrides), lambda o: compose(name, overrides=o)

    yield make
    GlobalHydra.instance().clear()
    register_configs()


def write_checkpoint(path, overrides, ema=False, seed=0):
    """A train.py checkpoint of the network `python train.py <overrides>` builds (random weights, BN statistics of
    one random batch); returns (file, config, model)."""
    import data as data_lib

    cfg = compose_cfg(overrides)
    _, _, info = data_lib.build_datasets(cfg.data)
    task = build_task(OmegaConf.to_container(cfg.task, resolve=True), info)
    torch.manual_seed(seed)
    model, backbone, _ = build_network(cfg, task, info)
    with torch.no_grad():
        backbone.train()(torch.randn(8, info.in_chans, *info.input_size))
    model.eval()
    state = {"model": model.state_dict(), "ema": model.state_dict() if ema else None, "config": OmegaConf.to_yaml(cfg)}
    torch.save(state, path)
    return Path(path), cfg, model


def run_script(name, args, cwd):
    """`python scripts/<name>.py <args>` in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


TINY_RUN = TINY_MODEL + TINY
