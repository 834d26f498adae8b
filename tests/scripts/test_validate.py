"""scripts/validate.py: the trainer's own evaluation of a train.py checkpoint or an official state_dict, and one
clear line for each bad input."""
import csv
import json

import numpy as np
import pytest
import torch

from data import build_datasets
from engine.config import ConfigError
from engine.inference import Checkpoint, Loaded
from engine.verification import evaluate_pairset
from scripts.validate import validate
from tests.engine.conftest import run_train
from tests.scripts.conftest import TINY_RUN, run_script, write_checkpoint

SMALL_REDNET = ["model=rednet", "model.depth=26", "model.width=0.25", "model.small_input=true"]
SYNTHETIC = ["data=synthetic", "data.img_size=16", "data.val_size=32", "data.batch_size=16", "data.workers=0"]


def official_rednet(path, seed=0):
    """A RedNet state_dict in the official (mmcls) layout: `backbone.` keys and the `head.fc.` classifier."""
    _, _, model = write_checkpoint(path, SMALL_REDNET + SYNTHETIC, seed=seed)
    sd = {("head." if k.startswith("fc.") else "backbone.") + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, path)
    return sd, model


@pytest.mark.slow
def test_top1_equals_the_training_log_exactly(tmp_path):
    """A short run with EMA; validating its best.pt (model and EMA weights, one -m sweep) gives the logged values."""
    run = tmp_path / "run"
    run_train(["trainer.epochs=1", "trainer.limit_train_batches=4", "trainer.model_ema=true",
               "trainer.model_ema_decay=0.5"], run)
    row = next(csv.DictReader(open(run / "metrics.csv")))
    out = tmp_path / "results.json"
    proc = run_script("validate", ["-m", f"checkpoint={run}/checkpoints/best.pt", "use_ema=false,true",
                                   f"results_file={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, ema = json.loads(out.read_text())
    assert (plain["use_ema"], ema["use_ema"]) == (False, True)
    for res, prefix in ((plain, "val_"), (ema, "val_ema_")):
        for key in ("acc1", "acc5", "loss"):
            assert res[key] == float(row[prefix + key]), (prefix, key)  # the same float, not a near one
    assert f"acc1 {plain['acc1']:.3f}" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # validating writes no run folder


def test_command_line_keys_go_on_top_of_the_checkpoint_config(tmp_path, script_config):
    ckpt, train_cfg, _ = write_checkpoint(tmp_path / "last.pt", TINY_RUN + ["model.width=0.25"])
    overrides = [f"checkpoint={ckpt}", "data.val_size=32", "trainer.limit_val_batches=1", "debug=fdr"]
    cfg, compose = script_config("validate", overrides)
    run_cfg = Checkpoint(str(ckpt)).config(cfg, overrides, compose)
    assert run_cfg.model == train_cfg.model and cfg.model.width == 0.125  # the run's, not train.yaml's default
    assert (run_cfg.data.val_size, run_cfg.data.img_size, run_cfg.trainer.limit_val_batches) == (32, 16, 1)
    assert run_cfg.trainer.dry_run and "checkpoint" not in run_cfg


def test_a_new_data_group_replaces_the_checkpoint_data_node(tmp_path, script_config):
    ckpt, _, _ = write_checkpoint(tmp_path / "last.pt", TINY_RUN)
    overrides = [f"checkpoint={ckpt}", "data=synthetic"]
    cfg, compose = script_config("validate", overrides)
    run_cfg = Checkpoint(str(ckpt)).config(cfg, overrides, compose)
    assert run_cfg.data == cfg.data and run_cfg.data.img_size == 32  # configs/data/synthetic.yaml, not TINY's 16


def test_official_state_dict_is_converted_into_the_named_model(tmp_path, script_config):
    sd, model = official_rednet(tmp_path / "rednet.pth")
    overrides = ["checkpoint=" + str(tmp_path / "rednet.pth"), *SMALL_REDNET, *SYNTHETIC]
    cfg, compose = script_config("validate", overrides)
    ckpt = Checkpoint(cfg.checkpoint)
    loaded = Loaded(ckpt.config(cfg, overrides, compose), ckpt, use_ema=False)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    res = validate(cfg, overrides, compose)
    assert set(res) >= {"acc1", "acc5", "loss"} and 0 <= res["acc1"] <= res["acc5"] <= 100


def test_official_state_dict_with_wrong_keys_lists_the_first_ones(tmp_path, script_config):
    sd, _ = official_rednet(tmp_path / "rednet.pth")
    missing = list(sd)[:7]
    for i, key in enumerate(missing):
        sd[f"backbone.bogus{i}.weight"] = sd.pop(key)
    torch.save(sd, tmp_path / "bad.pth")
    overrides = ["checkpoint=" + str(tmp_path / "bad.pth"), *SMALL_REDNET, *SYNTHETIC]
    cfg, compose = script_config("validate", overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, overrides, compose)
    msg = str(err.value)
    assert "\n" not in msg and f"checkpoint={tmp_path / 'bad.pth'} does not fit model=rednet" in msg
    assert f"missing keys 7 ({', '.join(k.removeprefix('backbone.') for k in missing[:5])}, ...)" in msg
    assert "unexpected keys 7 (backbone.bogus0.weight, " in msg and "backbone.bogus5" not in msg


@pytest.mark.parametrize("overrides,match", [
    (["model=rednet26"], r"holds dynconv_resnet50/default, the command asks for rednet26/default \(model.name: "
                         r"dynconv_resnet50 -> rednet26"),
    (["op=involution", "policy=all_3x3"], "the command asks for dynconv_resnet50/involution"),
    (["use_ema=true"], "holds no EMA weights"),
])
def test_checkpoint_of_another_network_is_refused(tmp_path, script_config, overrides, match):
    ckpt, _, _ = write_checkpoint(tmp_path / "best.pt", TINY_RUN)
    cfg, compose = script_config("validate", [f"checkpoint={ckpt}", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate(cfg, [f"checkpoint={ckpt}", *overrides], compose)


def test_official_state_dict_needs_a_model_with_an_official_layout(tmp_path, script_config):
    official_rednet(tmp_path / "rednet.pth")
    overrides = ["checkpoint=" + str(tmp_path / "rednet.pth"), *SYNTHETIC]
    cfg, compose = script_config("validate", overrides)
    with pytest.raises(ConfigError, match="read as an official state_dict, but no official checkpoint layout for "
                                          "'dynconv_resnet50'.*name its architecture with model="):
        validate(cfg, overrides, compose)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match=f"checkpoint={tmp_path / 'none.pt'}: no such file"):
        Checkpoint(str(tmp_path / "none.pt"))
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:500])
    with pytest.raises(ConfigError, match=f"checkpoint={tmp_path / 'cut.pt'} is damaged.*PyTorch cannot read it"):
        Checkpoint(str(tmp_path / "cut.pt"))


@pytest.mark.slow
def test_bad_input_is_one_line_without_traceback(tmp_path):
    proc = run_script("validate", [f"checkpoint={tmp_path / 'none.pt'}"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"validate.py: error: checkpoint={tmp_path / 'none.pt'}: no such file; give a best.pt/last.pt written by "
        "train.py (outputs/<name>/<run>/checkpoints/) or an official state_dict"]


def test_face_checkpoint_reports_accuracy_and_threshold_per_set(tmp_path, script_config):
    ckpt, cfg, model = write_checkpoint(tmp_path / "best.pt", ["task=face", "data=orl", "model=face_mobilenetv2_x0_1",
                                                               "data.img_size=32"])
    overrides = [f"checkpoint={ckpt}"]
    script_cfg, compose = script_config("validate", overrides)
    res = validate(script_cfg, overrides, compose)
    _, pairsets, _ = build_datasets(cfg.data)
    expected = evaluate_pairset(model.backbone, pairsets[0])
    orl = res["sets"]["orl"]
    assert list(res["sets"]) == ["orl"] and res["mean_acc"] == orl["acc"] == 100 * expected.acc
    assert orl["acc_std"] == 100 * expected.acc_std and orl["threshold"] == float(np.mean(expected.thresholds))


@pytest.mark.slow
@pytest.mark.parametrize("script, args, missing, usage", [
    ("validate", [], "checkpoint", "checkpoint=<best.pt, last.pt or official state_dict>"),
    ("predict", [], "checkpoint", "checkpoint=<best.pt or last.pt> inputs=<image, folder or glob>"),
])
def test_a_missing_required_key_is_one_line_with_the_usage(tmp_path, script, args, missing, usage):
    proc = run_script(script, args, tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"{script}.py: error: {missing}= is required: python scripts/{script}.py {usage}"]
