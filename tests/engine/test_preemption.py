"""Preemption: SIGTERM or submitit's USR2 saves the step in flight, and the run continues from it bit for bit."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import checkpoint as ck
from engine import preemption
from engine.config import ConfigError
from tests.engine.conftest import ROOT, TINY, TINY_MODEL, run_train, summary

# 160 / 16 = 10 updates per epoch
ARGS = ["trainer.epochs=3", "trainer.deterministic=true", "trainer.ckpt_interval=3", "data.train_size=160",
        "task.mixup=0.2", "data.augment=true"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final weights of the uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(ARGS, run)
    return ck.load(run / "checkpoints" / "last.pt")["model"]


def _assert_same_weights(run, reference):
    weights = ck.load(run / "checkpoints" / "last.pt")["model"]
    assert weights.keys() == reference.keys()
    for k in reference:
        assert torch.equal(weights[k], reference[k]), f"{k} differs from the uninterrupted run"


def _stop_line(text, name):
    lines = [ln for ln in text.splitlines() if f"{name}: stopped after update" in ln]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def test_sigterm_mid_epoch_saves_that_step_and_the_resumed_run_matches(tmp_path, reference):
    """SIGTERM to the whole process group, DataLoader workers included, as a cluster sends it."""
    run = tmp_path / "run"
    tiny = [a for a in TINY if not a.startswith("data.workers=")]
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_MODEL, *tiny, "data.workers=2", *ARGS, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = run / "train.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "epoch 0:" in log.read_text()):  # the marker: epoch 1 is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    state = ck.load(run / "checkpoints" / "last.pt")
    assert state["epoch"] >= 1 and 10 * state["epoch"] + state["batch"] == state["num_updates"] < 30
    line = _stop_line(log.read_text(), "SIGTERM")
    assert f"update {state['num_updates']} (epoch {state['epoch']}, batch {state['batch']})" in line
    assert f"trainer.resume={run}" in line
    run_train(ARGS + [f"trainer.resume={run}"])
    _assert_same_weights(run, reference)


def test_a_signal_during_the_save_is_only_recorded(tmp_path, reference):
    """SIGTERM arrives inside every checkpoint write (update 3's, then the preemption save itself): each file is
    complete, the run stops after update 4, and the resumed run matches."""
    run = tmp_path / "run"
    proc = run_train(ARGS, run, env={"DYNCONV_FAULT_KILL": "save", "DYNCONV_FAULT_SIGNAL": "TERM"}, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    state = ck.load(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["num_updates"]) == (0, 4, 4)
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name != "last.pt"]  # no temporary file left
    _stop_line((run / "train.log").read_text(), "SIGTERM")
    run_train(ARGS + [f"trainer.resume={run}"])
    _assert_same_weights(run, reference)


@pytest.mark.slow
def test_submitit_local_job_is_requeued_and_finishes_in_its_folder(tmp_path, reference):
    """USR2 (submitit's preemption signal) at update 14: the job saves, submitit requeues it, and the requeued job
    continues the same run folder from that step without trainer.resume."""
    sweep = tmp_path / "sweep"
    run_train(["-m", "hydra/launcher=submitit_local", *ARGS, f"hydra.sweep.dir={sweep}"],
              env={"DYNCONV_FAULT_KILL": "update:14", "DYNCONV_FAULT_SIGNAL": "USR2"})
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    log = (sweep / "0" / "train.log").read_text()
    assert "update 15 (epoch 1, batch 5)" in _stop_line(log, "SIGUSR2")
    assert f"resumed from {sweep / '0' / 'checkpoints' / 'last.pt'} at epoch 1, batch 5 (update 15)" in log
    assert summary(sweep / "0")["num_updates"] == 30
    _assert_same_weights(sweep / "0", reference)


def test_hand_over_runs_the_jobs_own_handler_then_exits(monkeypatch):
    """After the save the signal goes on to the handler the job had (submitit's requeue), then the run exits."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with preemption.Listener() as listener:
            os.kill(os.getpid(), signal.SIGUSR2)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
            assert listener.agreed(preemption.distributed.DistInfo()) == signal.SIGUSR2 and not seen
            with pytest.raises(preemption.Preempted) as stop:
                listener.hand_over(signal.SIGUSR2)
        assert seen == [signal.SIGUSR2] and stop.value.code == 128 + signal.SIGUSR2
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)


CASES = [(None, signal.SIGTERM), (signal.SIGUSR2, signal.SIGTERM), (None, None)]  # each rank's signal


def _agree(rank, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for case, signums in enumerate(CASES):
        listener = preemption.Listener()
        listener.signum = signums[rank]
        out[case, rank] = listener.agreed(preemption.distributed.DistInfo(rank, 2))
    dist.destroy_process_group()


def test_every_rank_stops_when_any_rank_got_a_signal(tmp_path):
    """One rank's signal stops both at the same step; submitit's USR2 wins over SIGTERM (it requeues)."""
    out = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_agree, args=(str(tmp_path / "init"), out), nprocs=2)
    assert [[out[case, rank] for rank in (0, 1)] for case in range(len(CASES))] == \
        [[signal.SIGTERM] * 2, [signal.SIGUSR2] * 2, [None] * 2]


def test_a_submitit_job_resumes_only_its_own_config(tmp_path, monkeypatch):
    ck.atomic_save({"config": "seed: 0\n"}, tmp_path / "checkpoints" / "last.pt")
    assert preemption.requeued_checkpoint(tmp_path, "seed: 0\n") is None  # not a submitit job
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert preemption.requeued_checkpoint(tmp_path, "seed: 0\n") == (tmp_path, tmp_path / "checkpoints" / "last.pt")
    assert preemption.requeued_checkpoint(tmp_path / "fresh", "seed: 0\n") is None
    with pytest.raises(ConfigError, match="belongs to a run of another config"):
        preemption.requeued_checkpoint(tmp_path, "seed: 1\n")
