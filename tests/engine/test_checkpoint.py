import pickle
import random

import numpy as np
import pytest
import torch

from engine import checkpoint as ck


def test_atomic_save_roundtrip_and_no_temp_left(tmp_path):
    obj = {"w": torch.arange(5.0), "epoch": 3, "cfg": "a: 1\n"}
    ck.atomic_save(obj, tmp_path / "c" / "last.pt")
    out = ck.load(tmp_path / "c" / "last.pt")
    assert torch.equal(out["w"], obj["w"]) and out["epoch"] == 3
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["last.pt"]


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.atomic_save({"rng": ck.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(ck.load(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ck.CheckpointError, match="is damaged or not a checkpoint"):
        ck.load(p)


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
@pytest.mark.parametrize("mmap", [False, True])
def test_a_damaged_file_is_named_in_one_line(tmp_path, damage, mmap):
    p = tmp_path / "last.pt"
    ck.atomic_save({"w": torch.randn(64, 64)}, p)
    data = p.read_bytes()
    p.write_bytes({"truncated": data[:len(data) // 2], "text": b"weights: none\n", "empty": b""}[damage])
    with pytest.raises(ck.CheckpointError) as err:
        ck.load(p, mmap=mmap)
    assert str(err.value).startswith(f"{p} is damaged or not a checkpoint: PyTorch cannot read it") and "\n" not in str(err.value)


def test_resolve_resume(tmp_path):
    run = tmp_path / "outputs" / "train" / "run1"
    ck.atomic_save({"a": 1}, run / "checkpoints" / "last.pt")
    assert ck.resolve_resume(None) is None and ck.resolve_resume(False) is None
    assert ck.resolve_resume(True, tmp_path / "outputs") == (run, run / "checkpoints" / "last.pt")
    assert ck.resolve_resume(str(run)) == (run, run / "checkpoints" / "last.pt")
    assert ck.resolve_resume(str(run / "checkpoints" / "last.pt"))[0] == run
    with pytest.raises(FileNotFoundError, match="no unfinished run"):
        ck.resolve_resume(True, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither"):
        ck.resolve_resume(str(tmp_path / "missing"))


def test_resume_true_skips_finished_runs_and_says_which_it_picked(tmp_path, capsys):
    """A finished run (say a `debug=fdr` check) written after the interrupted one is not "resumed"."""
    import json
    import os

    outputs = tmp_path / "outputs"
    for age, (name, done) in enumerate([("finished", 2), ("unfinished", 1), ("older_finished", 3)]):
        run = outputs / "train" / name
        ck.atomic_save({"a": 1}, run / "checkpoints" / "last.pt")
        (run / "summary.json").write_text(json.dumps({"epochs_done": done, "total_epochs": max(done, 2)}))
        os.utime(run / "checkpoints" / "last.pt", (1e9 - age * 100, 1e9 - age * 100))  # "finished" is the newest
    run = outputs / "train" / "unfinished"
    assert ck.resolve_resume(True, outputs) == (run, run / "checkpoints" / "last.pt")
    said = capsys.readouterr().err
    assert said.startswith(f"trainer.resume=true: continuing {run}: the unfinished run whose last.pt is the newest")
    assert said.rstrip().endswith("skipped 1 newer finished run(s)")
    (run / "summary.json").write_text(json.dumps({"epochs_done": 2, "total_epochs": 2}))
    with pytest.raises(FileNotFoundError, match=r"no unfinished run .* \(3 finished\)"):
        ck.resolve_resume(True, outputs)


def test_run_state_round_trips_every_part_and_the_progress(tmp_path):
    """`RunState.state_dict()` is the checkpoint; `load_state_dict()` restores weights, EMA, optimizer and progress."""
    from engine.state import RunState

    def parts(seed):
        torch.manual_seed(seed)
        model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        return model, ema, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, ema, opt = parts(0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    saved = RunState(model, opt, ema=ema, config="model: {name: x}\n")
    saved.epoch, saved.batch, saved.num_updates, saved.skipped = 2, 3, 7, 1
    saved.history.append({"epoch": 0, "val_acc1": 50.0})
    ck.atomic_save(saved.state_dict(), tmp_path / "last.pt")
    state = ck.load(tmp_path / "last.pt")
    model2, ema2, opt2 = parts(1)
    restored = RunState(model2, opt2, ema=ema2)
    restored.load_state_dict(state)
    for a, b in [(model, model2), (ema, ema2)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert [getattr(restored, k) for k in RunState.PROGRESS] == [getattr(saved, k) for k in RunState.PROGRESS]
    assert state["config"] == "model: {name: x}\n" and state["scheduler"] is None and "rng" in state


def test_non_finite_weights_at_a_save_name_last_pt_only_if_it_exists(tmp_path):
    """The stop before a save of NaN weights says which checkpoint keeps the last finite state, or that none was
    written yet (it named a last.pt that did not exist)."""
    from types import SimpleNamespace

    from engine.trainer import NonFiniteLossError, Run

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    run = SimpleNamespace(main=True, model=net, ckpt_dir=tmp_path / "checkpoints", lr=lambda: 0.1,
                          state=SimpleNamespace(num_updates=7))
    with pytest.raises(NonFiniteLossError, match=r"weight holds NaN/inf at step 7 \(lr 0.1\); no checkpoint was "
                                                 r"written before"):
        Run.save(run)
    ck.atomic_save({"a": 1}, run.ckpt_dir / "last.pt")
    with pytest.raises(NonFiniteLossError, match=f"{run.ckpt_dir / 'last.pt'} keeps the last finite state"):
        Run.save(run)
