"""The face experiments: `experiment=tvconv_face_casia` holds TVConv's recipe (official
face_recognition/train_test.py) and runs on generated insightface data; `experiment=tvconv_face_orl` trains;
scripts/face_compare.py tabulates its runs."""
import io
import json
import os
import pickle
import subprocess
import sys
from statistics import mean

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from tests.engine.conftest import ROOT, summary
from tests.experiments.conftest import CONFIGS, compose_cfg
from tests.face.test_recordio import write_insightface_fixture

FACE_EXPERIMENTS = ["tvconv_face_casia", "tvconv_face_orl"]

CASIA_FACTS = {  # TVConv's train_test.py / model_interface.py / data_interface.py
    "data.name": "face_rec", "data.img_size": 96, "data.mean": [0.5], "data.std": [0.5], "data.augment": True,
    "data.hflip": 0.5, "data.batch_size": 512, "data.val_sets": ["lfw", "cfp_fp", "agedb_30"],
    "optim.opt": "sgd", "optim.momentum": 0.9, "optim.nesterov": False, "optim.weight_decay": 5e-4,
    "optim.filter_bias_and_bn": False, "sched.sched": "multistep", "sched.decay_milestones": [22, 30, 35],
    "sched.decay_rate": 0.1, "sched.warmup_epochs": 0, "sched.step_on_epochs": True, "trainer.epochs": 38,
    "task.margin.name": "cosface", "task.margin.m": 0.35, "task.margin.s": 32.0, "model.name": "face_mobilenetv2_x1_0",
    "op.name": "tvconv", "op.hidden_channels": 64, "op.hidden_layers": 3, "task.name": "face",
    "task.flip_test": False, "trainer.eval_metric": "mean_acc",
}


def leaves(node, prefix=""):
    """Dotted keys of every leaf of a nested dict."""
    for k, v in node.items():
        yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


@pytest.mark.parametrize("experiment", FACE_EXPERIMENTS)
def test_experiment_only_overrides_existing_keys(experiment):
    """Every key the file sets exists in the config its group choices compose to (a misspelt key in the open
    model/op/task sections would otherwise surface only when the run is built)."""
    body = yaml.safe_load((CONFIGS / "experiment" / f"{experiment}.yaml").read_text())
    groups = [f"{k.removeprefix('override /')}={v}" for entry in body.pop("defaults") if isinstance(entry, dict) for k, v in entry.items()]
    base = compose_cfg(groups)
    cfg = compose_cfg([f"experiment={experiment}"])
    for key in leaves(body):
        assert OmegaConf.select(base, key, default="<missing>") != "<missing>", f"{experiment}: unknown key {key}"
        assert OmegaConf.select(cfg, key) == OmegaConf.select(OmegaConf.create(body), key), key


def test_casia_experiment_is_tvconv_recipe():
    cfg = compose_cfg(["experiment=tvconv_face_casia"])
    for key, want in CASIA_FACTS.items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, f"{key}={got}"
    # lr = 0.1 at TVConv's global batch of 512, linear in the global batch (trainer: lr_base * batch / size)
    assert cfg.optim.lr is None and cfg.optim.lr_base * cfg.data.batch_size / cfg.optim.lr_base_size == 0.1


def test_command_line_choices_win_over_the_experiment():
    cfg = compose_cfg(["experiment=tvconv_face_orl", "op=default", "model=face_shufflenetv2_x0_5"])
    assert cfg.op.name is None and cfg.model.name == "face_shufflenetv2_x0_5" and cfg.data.name == "orl"


def run_train(args, run_dir):
    """train.py in a subprocess as a user runs it (no tiny defaults: the experiment's own data and model)."""
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return summary(run_dir)


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_casia_dry_run_on_generated_insightface_data(tmp_path):
    """The real path: train.rec/.idx and lfw/cfp_fp/agedb_30.bin at insightface's 112x112, resized to 96x96."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(8)]
    write_insightface_fixture(tmp_path, images, [0, 0, 1, 1, 2, 2, 3, 3])
    blobs = [png(images[k % 8]) for k in range(20)]  # 10 pairs: the fewest the 10-fold protocol takes
    for name in ["lfw", "cfp_fp", "agedb_30"]:
        with open(tmp_path / f"{name}.bin", "wb") as f:
            pickle.dump((blobs, [k % 2 == 0 for k in range(10)]), f)
    out = run_train(["experiment=tvconv_face_casia", f"data.root={tmp_path}", "data.batch_size=4",
                     "data.workers=0", "trainer.dry_run=true"], tmp_path / "run")
    assert out["num_updates"] == 2 and out["replacement"] > 0
    assert out["best"]["key"] == "val_mean_acc"
    final = out["final"]
    assert final["val_mean_acc"] == pytest.approx(mean(final[f"val_{s}/acc"] for s in ["lfw", "cfp_fp", "agedb_30"]))
    assert final["lr"] == pytest.approx(0.1 * 4 / 512)  # linear scaling from 0.1 at a global batch of 512
    assert out["config"]["data"]["img_size"] == 96 and out["config"]["model"]["name"] == "face_mobilenetv2_x1_0"


def test_orl_experiment_trains_a_few_steps(tmp_path):
    out = run_train(["experiment=tvconv_face_orl", "trainer.epochs=1", "trainer.limit_train_batches=2"],
                    tmp_path / "run")
    assert out["num_updates"] == 2 and out["config"]["op"]["name"] == "tvconv" and out["replacement"] > 0
    assert 0 <= out["final"]["val_orl/acc"] <= 100 and np.isfinite(out["final"]["train_loss"])
    # TVConv's two forms: the generator pass per image in training, counted once in the inference form
    assert out["macs_inference_once"] > 0 and out["macs_inference_per_image"] < out["macs_per_image"]
    assert out["macs_per_image"] == out["macs_inference_per_image"] + out["macs_inference_once"]
    assert (f"{out['macs_per_image']:,} MACs/image in the training form; inference form (freeze()): "
            f"{out['macs_inference_per_image']:,} MACs/image + {out['macs_inference_once']:,} once") in \
        (tmp_path / "run" / "train.log").read_text()


def test_face_compare_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "face_compare.py"), "--out", str(tmp_path), "--quick",
           "--folds", "0", "1", "--threads", "1"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-5000:]
    rows = [line.split(" | ") for line in (tmp_path / "table.md").read_text().splitlines()[2:]]
    assert [r[1] for r in rows] == ["—", "dwconv", "tvconv"]
    for op, row in zip(["default", "tvconv"], rows[1:]):
        runs = [json.loads((tmp_path / f"{op}_seed0_fold{f}" / "summary.json").read_text()) for f in (0, 1)]
        assert [r["config"]["data"]["fold"] for r in runs] == [0, 1]
        assert row[4].startswith(f"{mean(r['final']['val_orl/acc'] for r in runs):.2f} ± ")
        assert row[2] == f"{runs[0]['params'] / 1e6:.2f}M"
    assert float(rows[1][2][:-1]) < float(rows[2][2][:-1])  # TVConv's generator adds parameters
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.count("[reuse]") == 4  # finished runs are not repeated
