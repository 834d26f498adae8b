"""TensorBoard as a user opens it: a 2-run sweep of train.py, then the real `tensorboard` server from the venv, read
over its HTTP API (scalars and the HParams plugin), and the hparams read back from the event files."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.engine.conftest import read_scalars, run_train, summary

TENSORBOARD = Path(sys.executable).parent / "tensorboard"
SWEEP = ["-m", "model=resnet50", "model.width=0.125", "model.small_input=true", "data=mnist5k", "data.batch_size=32",
         "debug=limit", "trainer.limit_val_batches=8", "trainer.log_interval=1", "optim.lr=0.05,0.02"]

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb") / "sweep"
    run_train([*SWEEP, f"hydra.sweep.dir={root}"], tiny=False)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(sweep):
    """`tensorboard --logdir <sweep>` on a free loopback port; yields its base URL once it lists both runs."""
    port = _free_port()
    proc = subprocess.Popen([str(TENSORBOARD), "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"tensorboard exited:\n{proc.stdout.read()}"
            try:
                if sorted(_get(f"{base}/data/runs")) == ["0/tb", "1/tb"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "tensorboard did not list the sweep's two runs within 60 s"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_serves_val_acc1_and_train_loss(sweep, server):
    for run in ("0", "1"):
        logged = read_scalars(sweep / run)
        for tag in ("val/acc1", "train/loss"):
            points = _get(f"{server}/data/plugin/scalars/scalars?run={run}/tb&tag={tag}")
            assert [(step, value) for _, step, value in points] == logged[tag], tag  # both float32 as logged
        assert points[-1][1] == summary(sweep / run)["num_updates"]  # the last point is the run's last step
    final = _get(f"{server}/data/plugin/scalars/scalars?run=1/tb&tag=val/acc1")[-1][2]
    assert final == pytest.approx(summary(sweep / "1")["final"]["val_acc1"])


def test_hparams_plugin_shows_the_sweep_as_a_table(sweep, server):
    groups = _get(f"{server}/data/plugin/hparams/session_groups",
                  {"experimentName": "", "allowedStatuses": STATUSES, "colParams": [], "startIndex": 0,
                   "sliceSize": 10})["sessionGroups"]
    by_run = {g["name"].split("/")[0]: g for g in groups}
    assert sorted(by_run) == ["0", "1"]
    for run, lr in (("0", 0.05), ("1", 0.02)):
        hp = by_run[run]["hparams"]
        assert hp["optim.lr"] == pytest.approx(lr) and hp["choice/data"] == "mnist5k"
        assert hp["choice/model"] == "resnet50" and hp["model.width"] == pytest.approx(0.125)
        assert hp["commit"] == json.loads((sweep / run / "hparams.json").read_text())["hparams"]["commit"]
        metrics = {m["name"]["tag"]: m["value"] for m in by_run[run]["metricValues"]}
        final = summary(sweep / run)["final"]
        assert metrics["val/acc1"] == pytest.approx(final["val_acc1"])
        assert metrics["val/loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    experiment = _get(f"{server}/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"optim.lr", "choice/op", "choice/policy", "choice/data", "choice/optim", "commit"} <= columns
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"val/acc1", "train/loss"}


def test_hparams_read_back_from_the_event_files(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(sweep / "0" / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    record = json.loads((sweep / "0" / "hparams.json").read_text())
    # torch's summary writes a bool as a number
    assert hp == pytest.approx({k: float(v) if isinstance(v, bool) else v for k, v in record["hparams"].items()})
    assert hp["choice/policy"] == "none" and hp["trainer.log_interval"] == 1
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    tags = {m.name.tag for m in experiment.metric_infos}
    assert {"val/acc1", "val/loss", "train/loss", "train/acc1"} <= tags and tags == set(record["metrics"])


def test_hparams_list_group_choices_and_the_overridden_values_merged_into_groups():
    """A grid cell `++op={name:ddf,se_ratio:0.1}` is a value, not a group choice: its leaves are hparams."""
    from omegaconf import OmegaConf

    from engine import hparams

    cfg = OmegaConf.create({"op": {"name": "ddf", "se_ratio": 0.1}, "optim": {"lr": 0.1}, "seed": 2,
                            "model": {"width": 0.5, "stages": [1, 2]}})
    hp = hparams.collect(cfg, {"model": "mobilenetv2", "op": "default", "experiment": None},
                         ["experiment=ablation_grid", "++op={name:ddf,se_ratio:0.1}", "seed=2", "model=mobilenetv2",
                          "model.stages=[1,2]", "trainer.resume=true", "hydra.launcher.n_jobs=2"])
    assert hp == {"choice/model": "mobilenetv2", "choice/op": "default", "choice/experiment": "null", "op.name": "ddf",
                  "op.se_ratio": 0.1, "seed": 2, "model.stages": "[1, 2]", "commit": hparams.commit()}
