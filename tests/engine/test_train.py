"""`train.py` end to end: TensorBoard events, checkpoints, summary, resume after SIGKILL, DDP, sweeps."""
import csv
import math
import socket
import sys

import pytest
import torch

from engine import checkpoint as ck
from tests.engine.conftest import ROOT, read_scalars, read_text_tags, run_train, summary


def test_train_writes_events_checkpoints_and_summary(tmp_path):
    run = tmp_path / "run"
    run_train(["trainer.epochs=3", "optim.lr=0.05", "trainer.log_interval=2", "trainer.count_flops=true",
               "trainer.model_ema=true", "trainer.model_ema_decay=0.9"], run)
    s = read_scalars(run)
    for tag in ["train/loss", "train/acc1", "val/loss", "val/acc1", "val/acc5", "val_ema/acc1", "lr",
                "perf/img_per_s", "perf/epoch_time", "perf/data_time"]:
        assert tag in s, f"missing TensorBoard scalar {tag}; have {sorted(s)}"
    assert "config/text_summary" in read_text_tags(run)
    losses = [v for _, v in s["train/loss"]]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    assert s["val/acc1"][-1][1] > 50.0  # the synthetic classes are learnable
    out = summary(run)
    assert out["epochs_done"] == 3 and out["params"] > 0 and out["macs_per_image"] > 0
    assert out["best"]["metric"] is not None and out["img_per_s"] > 0 and out["wall_time_s"] > 0
    assert out["config"]["trainer"]["epochs"] == 3
    last = ck.load(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 3 and last["ema"] is not None and "rng" in last and "optimizer" in last
    assert (run / "checkpoints" / "best.pt").exists() and (run / ".hydra" / "config.yaml").exists()
    assert (run / "train.log").read_text().count("epoch 2:") == 1
    last_line = (run / "train.log").read_text().strip().splitlines()[-1]  # what the README's quickstart quotes
    best = out["best"]
    assert best["key"] == "val_ema_acc1" and "finished: 3 epochs" in last_line, last_line
    assert (f"; EMA weights (trainer.model_ema=true; they pick best.pt, its `ema` entry); val_ema_acc1 "
            f"{out['final']['val_ema_acc1']:.2f} at the end, best {best['metric']:.2f} (epoch {best['epoch']}); "
            f"raw weights: val_acc1 {out['final']['val_acc1']:.2f} at the end") in last_line, last_line
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]


def _weights(run):
    return ck.load(run / "checkpoints" / "last.pt")["model"]


def test_resume_after_sigkill_mid_epoch_matches_uninterrupted_run(tmp_path):
    args = ["trainer.epochs=2", "trainer.deterministic=true", "trainer.ckpt_interval=3", "trainer.log_interval=1",
            "data.train_size=160", "task.mixup=0.2", "data.augment=true"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_train(args, ref)
    # 160 / 16 = 10 updates per epoch: killed at update 14 (epoch 1), the last checkpoint is update 12
    killed = run_train(args, run, env={"DYNCONV_FAULT_KILL": "update:14"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = ck.load(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["num_updates"]) == (1, 2, 12)
    run_train(args + [f"trainer.resume={run}"])
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    rows = list(csv.reader(open(run / "metrics.csv")))
    assert rows[0][0] == "epoch" and [r[0] for r in rows[1:]] == ["0", "1"]  # one header, no duplicate rows
    ref_loss, run_loss = read_scalars(ref)["train/loss"], read_scalars(run)["train/loss"]
    assert [s for s, _ in run_loss] == [s for s, _ in ref_loss]  # the killed run's extra points are purged
    assert max(abs(x - y) for (_, x), (_, y) in zip(ref_loss, run_loss)) == 0.0


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_train(["trainer.epochs=1"], run)
    before = ck.load(run / "checkpoints" / "last.pt")
    killed = run_train([f"trainer.resume={run}", "trainer.epochs=2"], env={"DYNCONV_FAULT_KILL": "save"},
                       check=False)
    assert killed.returncode == -9
    after = ck.load(run / "checkpoints" / "last.pt")  # still loadable, still the epoch-1 state
    assert after["epoch"] == before["epoch"] == 1
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])


def test_resume_does_not_let_a_worse_epoch_replace_best(tmp_path):
    run = tmp_path / "run"
    run_train(["trainer.epochs=1"], run)
    # pretend the finished epoch was unbeatable: after resuming, no epoch may replace best.pt
    last = ck.load(run / "checkpoints" / "last.pt")
    last["best"] = {"metric": 100.0, "epoch": 0, "key": "val_acc1"}
    ck.atomic_save(last, run / "checkpoints" / "last.pt")
    best_before = (run / "checkpoints" / "best.pt").read_bytes()
    run_train([f"trainer.resume={run}", "trainer.epochs=2"])
    assert (run / "checkpoints" / "best.pt").read_bytes() == best_before
    assert summary(run)["best"] == {"metric": 100.0, "epoch": 0, "key": "val_acc1"}
    assert ck.load(run / "checkpoints" / "last.pt")["epoch"] == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun():
    """A 2-process torchrun launcher on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


def test_two_process_ddp_equals_one_process(tmp_path):
    common = ["trainer.epochs=1", "trainer.log_interval=1", "trainer.limit_train_batches=4", "trainer.sync_bn=true",
              "optim.lr=0.05"]
    single, ddp, temp = tmp_path / "single", tmp_path / "ddp", tmp_path / "temp"
    temp.mkdir()
    run_train(common + ["data.batch_size=16"], single)
    run_train(common + ["data.batch_size=8"], ddp, launcher=_torchrun(), env={"TMPDIR": str(temp)})
    a, b = read_scalars(single)["train/loss"], read_scalars(ddp)["train/loss"]
    assert len(a) == len(b) == 4
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and abs(la - lb) < 1e-5, (a, b)
    assert not list(temp.glob("dynconv-rank*"))  # rank 1's throw-away Hydra folder is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single", "temp"]  # one run folder per run


def test_dist_bn_reduce_averages_the_ranks_bn_statistics(tmp_path):
    """timm's --dist-bn (DDF's recipe): at epoch end 'reduce' averages the BN running statistics of the
    ranks, 'broadcast' takes rank 0's. The ranks see different batches (no sync_bn), so the saved statistics
    differ between the two modes (if the option were ignored they would be equal)."""
    common = ["trainer.epochs=1", "trainer.limit_train_batches=3", "data.batch_size=8", "optim.lr=0.05"]
    stats = {}
    for mode in ("reduce", "broadcast"):
        run_train(common + [f"trainer.dist_bn={mode}"], tmp_path / mode, launcher=_torchrun())
        state = ck.load(tmp_path / mode / ck.CKPT_DIR / "last.pt")["model"]
        stats[mode] = {k: v for k, v in state.items() if k.endswith("running_mean")}
    assert stats["reduce"].keys() == stats["broadcast"].keys() and stats["reduce"]
    assert any(not torch.allclose(stats["reduce"][k], stats["broadcast"][k]) for k in stats["reduce"])


def test_multirun_sweep_makes_one_folder_per_run(tmp_path):
    proc = run_train(["-m", "optim.lr=0.1,0.05", "trainer.epochs=1", "trainer.limit_train_batches=2",
                      f"hydra.sweep.dir={tmp_path}"])
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"], proc.stdout
    assert [summary(p)["config"]["optim"]["lr"] for p in runs] == [0.1, 0.05]


@pytest.mark.parametrize("override, message", [
    ("trainer.epoch=3", "epoch"),
    ("trainer.epochs=three", "epochs"),
    ("op=nosuchop", "nosuchop"),
    ("trainer.dist_bn=mean", "trainer.dist_bn='mean': must be '' (off), reduce or broadcast"),
])
def test_bad_config_fails_with_a_clear_error(tmp_path, override, message):
    proc = run_train([override], tmp_path / "run", check=False)
    assert proc.returncode != 0 and message in proc.stderr + proc.stdout


def test_help_lists_config_groups():
    import subprocess
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT).stdout
    assert "Configuration groups" in out
    for group in ["model", "op", "policy", "data", "optim", "sched", "trainer", "task", "experiment"]:
        assert f"{group}:" in out or f"\n{group}" in out, out


def test_training_options_run_together(tmp_path):
    """bf16 autocast, channels_last, accumulation, AdamW, multistep warmup, mixup+cutmix, clipping, EMA."""
    run = tmp_path / "run"
    run_train(["trainer.epochs=2", "trainer.limit_train_batches=4", "trainer.amp=true", "trainer.channels_last=true",
               "trainer.grad_accum_steps=2", "optim=adamw", "sched=multistep", "sched.decay_milestones=[1]",
               "sched.warmup_epochs=1", "task.mixup=0.2", "task.cutmix=1.0", "optim.clip_grad=1.0",
               "trainer.model_ema=true", "trainer.log_interval=1"], run)
    s = read_scalars(run)
    assert len(s["train/loss"]) == 4  # 4 micro-batches, 2 per update → 2 updates per epoch
    assert all(math.isfinite(v) for _, v in s["train/loss"])
    lrs = [v for _, v in s["lr"]]
    assert lrs[0] == lrs[1] < lrs[-1]  # warmup at 1e-5 through epoch 0, then the scheduled value
    assert summary(run)["num_updates"] == 4
