"""Every command and Python block of README.md works as written, read from the README at test time (a README edit
that breaks a command fails here).

- `python train.py ...` (also under `torchrun`): composes (a sweep: its first choice of each swept key; with its
  `hydra.*` keys, the launcher's config too) and passes the schema; a single CPU run then builds its data and its
  network. Data that is not on this machine (ImageNet roots) must fail with the one-line `MissingDataError`
  (train.py's `train.py: error: ...`); pretrained weights, offline, with the one-line `ModelError` naming
  `model.pretrained_file=`. A command the README gives as a quick check (`debug=...`) is run for real.
- `python scripts/<x>.py ...`: `export.py` resolves its `--arch`, `--op` and `--policy`; `convert_checkpoint.py`,
  whose input is not here, ends in its one-line error; every other script answers `--help`.
- `bash <file>` exists and parses (`bash -n`); `make <target>` names a Makefile target; `python -m <module>`
  names an importable module.
- Each ```python block runs in a fresh interpreter from the repository root.
Sweeps, clusters, several processes and GPUs are composed only: nothing here needs them.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.engine.conftest import ROOT, compose_cfg
from tests.scripts.conftest import help_exits as script_help_exits

README = (ROOT / "README.md").read_text()
FENCED = re.compile(r"```(\w*)\n(.*?)```", re.S)
PROGRAMS = ("python ", "torchrun ", "bash ", "make ")


def _shell_lines(text: str) -> list[str]:
    """Commands of a bash block: `\\` continuations joined, comments dropped."""
    return [line for line in (shlex.join(shlex.split(ln, comments=True)) if ln.strip() else ""
                              for ln in text.replace("\\\n", " ").splitlines()) if line]


def readme_commands() -> list[str]:
    """Every shell command of README.md: the lines of its bash blocks and every inline code span that starts with
    a program (`python`, `torchrun`, `bash`, `make`), in the tables and the prose."""
    commands = [c for lang, body in FENCED.findall(README) if lang == "bash" for c in _shell_lines(body)]
    prose = FENCED.sub("", README)
    commands += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose) if span.startswith(PROGRAMS)]
    return list(dict.fromkeys(c for c in commands if c.startswith(PROGRAMS)))


def python_blocks() -> list[str]:
    """The ```python blocks, each line with an `# ... (in a clone: `<code>`)` comment read as that code."""
    clone = re.compile(r"^(\s*)\S.*?#.*\(in a clone: `([^`]+)`\).*$", re.M)
    return [clone.sub(r"\1\2", body) for lang, body in FENCED.findall(README) if lang == "python"]


COMMANDS = readme_commands()
TRAIN = [c for c in COMMANDS if re.match(r"(python|torchrun .*?) train\.py( |$)", c)]
SCRIPTS = [c for c in COMMANDS if c.startswith("python scripts/")]
OTHER = [c for c in COMMANDS if c not in TRAIN and c not in SCRIPTS]


def test_the_readme_has_commands_of_every_kind():
    assert len(TRAIN) >= 20 and len(SCRIPTS) >= 8 and python_blocks()
    assert "python train.py debug=fdr" in TRAIN


def _tokens(command: str) -> list[str]:
    """The command's arguments as the shell splits them; a `<placeholder>` is one argument, whatever it holds."""
    return shlex.split(re.sub(r"<[^<>]*>", "<placeholder>", command))


def _overrides(command: str) -> tuple[list[str], bool]:
    """(overrides, multirun) of a train.py command: flags and `<placeholder>` arguments left out, each swept key at
    its first choice (the runs of a sweep differ only there)."""
    tokens = _tokens(command.split("train.py", 1)[1])
    multirun = any(t in ("-m", "--multirun") for t in tokens)
    parser, out = OverridesParser.create(), []
    skip_next = False
    for t in tokens:
        if skip_next or t.startswith("-") or "<" in t:
            skip_next = t == "--cfg"
            continue
        override = parser.parse_override(t)
        if override.is_sweep_override():
            t = f"{t.split('=', 1)[0]}={next(iter(override.sweep_string_iterator()))}"
        out.append(t)
    return out, multirun


def _local(cfg, multirun: bool, command: str) -> bool:
    """A single run on this machine's CPU (no cluster, no second process, no GPU)."""
    return not multirun and not command.startswith("torchrun") and "trainer=ddp" not in command and \
        cfg.trainer.device in ("auto", "cpu")


@pytest.mark.parametrize("command", TRAIN)
def test_train_command(command, tmp_path, monkeypatch):
    from data import build_datasets
    from data.config import MissingDataError
    from engine.config import validate
    from engine.tasks import build_task
    from engine.trainer import build_network
    from models._factory import ModelError

    overrides, multirun = _overrides(command)
    job = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    cfg = compose_cfg(job)
    validate(cfg)
    if len(job) < len(overrides) or multirun:  # the launcher and sweeper it names compose too
        OmegaConf.to_container(compose_cfg(overrides, hydra_cfg=True).hydra.launcher, resolve=True)
    if not _local(cfg, multirun, command):
        return
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # a download fails at once
    if any(o.startswith("debug=") for o in overrides):  # the README's quick checks: run as written
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    try:
        _, _, info = build_datasets(cfg.data)
    except MissingDataError as e:  # data that is not on this machine: the one-line error train.py prints
        assert cfg.data.root is None or not os.path.exists(cfg.data.root), e
        return
    task = build_task(OmegaConf.to_container(cfg.task, resolve=True), info)
    try:
        build_network(cfg, task, info)
    except ModelError as e:  # weights not on this machine (a file, or a download while offline): one line
        assert cfg.model.get("pretrained") and "model.pretrained_file=" in str(e) and "\n" not in str(e), e
        assert not cfg.model.get("pretrained_file") or not os.path.exists(cfg.model.pretrained_file), e


ROOT_SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def help_exits() -> dict[str, int | str]:
    """`--help` of every script the README names."""
    return script_help_exits(sorted({_tokens(c)[1] for c in SCRIPTS}))


@pytest.mark.parametrize("command", SCRIPTS)
def test_script_command(command, help_exits):
    tokens = _tokens(command)
    script = tokens[1]
    assert (ROOT / script).is_file(), script
    args = tokens[2:]
    if script == "scripts/export.py":
        import dynconv
        from dynconv.replace import POLICIES

        sys.path.insert(0, str(ROOT_SCRIPTS))
        from export import resolve_arch

        opts = dict(zip(args, args[1:]))
        if "--arch" in opts:
            resolve_arch(opts["--arch"])
        assert opts.get("--op", "conv") in dynconv.list_ops() and opts.get("--policy", "none") in POLICIES
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if script == "scripts/convert_checkpoint.py" and not any("<" in a for a in args):
        proc = subprocess.run([sys.executable, *tokens[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("convert_checkpoint.py: error: ")
        return
    assert help_exits[script] == 0, help_exits[script]


@pytest.mark.parametrize("command", OTHER)
def test_other_command(command):
    tokens = _tokens(command)
    if tokens[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        assert tokens[1] in targets, command
    elif tokens[:2] == ["python", "-m"]:
        import importlib.util

        assert importlib.util.find_spec(tokens[2]) is not None, command
    else:
        assert tokens[0] == "bash", command
        proc = subprocess.run(["bash", "-n", tokens[1]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.split("\n", 1)[0][:40])
def test_python_block(block):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", block], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
