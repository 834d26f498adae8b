"""Bad inputs fail early and clearly, and nothing a run folder holds can run code or be damaged (issue 17)."""
import hashlib
import math
import os
import re
import shutil

import pytest
import torch

from engine import checkpoint as ck
from engine.config import CONFIG_DIR, ConfigError, replayable_overrides, validate
from tests.engine.conftest import compose_cfg, run_train, summary

PAYLOAD = ["+hydra.callbacks.pwn._target_=os.system", "+hydra.callbacks.pwn._args_=[touch PWNED]"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch DY-Conv run (the replacement table is logged on the way)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = run_train(["debug=fdr", "op=dyconv", "policy=all_3x3"], run)
    return run, proc


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_refuses_hydra_callbacks_from_the_run_folder(finished_run, tmp_path):
    run, _ = finished_run
    overrides = run / ".hydra" / "overrides.yaml"
    clean = overrides.read_text()
    try:
        overrides.write_text(clean + "".join(f"- {o}\n" for o in PAYLOAD))
        line = clean.count("\n") + 1  # the payload's first line
        proc = run_train([f"trainer.resume={run}"], check=False, cwd=tmp_path)
    finally:
        overrides.write_text(clean)
    assert not (tmp_path / "PWNED").exists() and not list(tmp_path.rglob("PWNED"))
    assert proc.returncode != 0
    assert f"{overrides}:{line}: refusing to replay '{PAYLOAD[0]}'" in proc.stderr, proc.stderr[-2000:]


def test_failed_resume_leaves_the_run_folder_unchanged(finished_run, tmp_path):
    run, _ = finished_run
    before = _digest(run)
    proc = run_train([f"trainer.resume={run}", "model=rednet26"], check=False, cwd=tmp_path)
    assert proc.returncode != 0
    assert "checkpoint is dynconv_resnet50/dyconv, the command asks for rednet26/dyconv" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, not a state_dict dump
    assert _digest(run) == before


def test_resume_from_a_damaged_last_pt_names_it_and_offers_best_pt(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])  # cut short, as by a full disk
    before = _digest(run)
    proc = run_train([f"trainer.resume={run}"], check=False, cwd=tmp_path)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"train.py: error: trainer.resume: {last} is damaged or not a checkpoint")
    assert proc.stderr.strip().endswith(f"resume from trainer.resume={run / 'checkpoints' / 'best.pt'}")
    assert _digest(run) == before


def test_replacement_table_is_logged_once(finished_run):
    _, proc = finished_run
    assert (proc.stdout + proc.stderr).count("params before→after") == 1


def test_diverging_run_stops_naming_step_lr_and_loss(tmp_path):
    run = tmp_path / "run"
    proc = run_train(["data=mnist5k", "optim.lr=1e30", "debug=limit", "model=resnet50_small"], run, check=False,
                     tiny=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]  # one line, no traceback
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(r"train.py: error: non-finite loss at step \d+ \(epoch 0, batch \d+\), "
                    r"lr [\d.]+e\+(29|30), loss -?(nan|inf);", err), err
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "summary.json").exists()
    assert f"stopped: {err.removeprefix('train.py: error: ')}" in (run / "train.log").read_text()  # why, in the log


def test_skipped_steps_warn_and_a_later_divergence_keeps_the_last_finite_checkpoints(tmp_path):
    """The lr jumps ×1e30 at epoch 1: epoch 0's checkpoints and summary survive, one bad step is skipped."""
    run = tmp_path / "run"
    proc = run_train(["debug=limit", "sched=step", "sched.decay_epochs=1", "sched.decay_rate=1e30",
                      "sched.step_on_epochs=true", "trainer.skip_nonfinite=1"], run, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("update skipped (1 of trainer.skip_nonfinite=1)") == 1, out[-3000:]
    assert "1 bad step(s) skipped before (trainer.skip_nonfinite=1)" in out
    for name in ("last.pt", "best.pt"):
        state = ck.load(run / "checkpoints" / name)
        assert state["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    s = summary(run)
    assert s["epochs_done"] == 1 and "NaN" not in (run / "summary.json").read_text()
    assert math.isfinite(s["best"]["metric"])


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0: must be > 0"),
    ("trainer.epochs=0", "trainer.epochs=0: must be > 0"),
    ("optim.lr=-0.1", "optim.lr=-0.1: must be >= 0"),
    ("trainer.model_ema_decay=1.5", "trainer.model_ema_decay=1.5: must be in [0, 1]"),
    ("data.reprob=2", "data.reprob=2.0: must be in [0, 1]"),
    ("+optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean optim.lr?"),
    ("+trainer.epoch=3", "unknown config key 'trainer.epoch'; did you mean trainer.epochs?"),
    ("+sched.warmup=3", "unknown config key 'sched.warmup'; did you mean sched.warmup_lr?"),
    ("+data.batchsize=3", "unknown config key 'data.batchsize'; did you mean data.batch_size?"),
    ("+sede=1", "unknown config key 'sede'; did you mean seed?"),
])
def test_validate_names_the_bad_key(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([override]))
    assert message in str(err.value)


def test_train_py_rejects_an_added_misspelt_key(tmp_path):
    proc = run_train(["+optim.lrr=0.1"], tmp_path / "run", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
        "train.py: error: unknown config key 'optim.lrr'; did you mean optim.lr?")
    assert "Traceback" not in proc.stderr


def test_unsafe_checkpoint_error_never_suggests_disabling_the_check(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": print}, p)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load(p)
    msg = str(err.value)
    assert f"{p} is unsafe: it holds a reference to print" in msg
    assert "weights_only" not in msg


@pytest.mark.parametrize("override", ["+op.module=evil_ops", "++op={name:conv,module:evil_ops}"])
def test_replay_refuses_an_operator_module_from_the_run_folder(tmp_path, override):
    """`op.module` imports Python code, so a run folder cannot bring one along; the user may pass it again."""
    saved = tmp_path / "overrides.yaml"
    saved.write_text(f"- op=ddf\n- '{override}'\n")
    with pytest.raises(ConfigError, match=rf"{saved}:2: refusing to replay .*op.module imports Python code"):
        replayable_overrides(saved)


def test_resume_refuses_a_config_group_that_names_a_file_outside_configs(finished_run, tmp_path):
    """The reproduced attack: `experiment=../../<elsewhere>/evil` in the run folder's overrides composed a
    `# @package _global_` file that installed a Hydra callback running a shell command."""
    run, _ = finished_run
    evil = tmp_path / "x" / "evil.yaml"
    evil.parent.mkdir()
    evil.write_text("# @package _global_\nhydra:\n  callbacks:\n    pwn:\n      _target_: os.system\n"
                    "      _args_: [touch PWNED]\n")
    attack = "experiment=" + os.path.relpath(evil.with_suffix(""), CONFIG_DIR / "experiment")
    overrides = run / ".hydra" / "overrides.yaml"
    clean = overrides.read_text()
    try:
        overrides.write_text(clean + f"- {attack}\n")
        proc = run_train([f"trainer.resume={run}"], check=False, cwd=tmp_path)
    finally:
        overrides.write_text(clean)
    assert not list(tmp_path.rglob("PWNED"))
    assert proc.returncode != 0
    line = clean.count("\n") + 1
    assert (f"{overrides}:{line}: refusing to replay '{attack}': experiment= must name an option of "
            "configs/experiment/") in proc.stderr, proc.stderr[-2000:]
