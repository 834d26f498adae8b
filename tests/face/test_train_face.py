"""`python train.py task=face data=orl ...` end to end: verification scalars, ROC and TVConv images."""
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.engine.conftest import read_scalars, run_train, summary

FACE = ["task=face", "data=orl", "model=face_mobilenetv2_x0_1", "data.img_size=32", "data.batch_size=32",
        "trainer.epochs=1", "trainer.limit_train_batches=2"]


def test_face_training_reports_verification_on_held_out_identities(tmp_path):
    run = tmp_path / "run"
    run_train(FACE + ["op=tvconv", "margin=arcface"], run)
    s = read_scalars(run)
    for tag in ["train/loss", "val/mean_acc", "val/orl/acc", "val/orl/auc", "lr"]:
        assert tag in s, sorted(s)
    assert 0 <= s["val/orl/acc"][-1][1] <= 100
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    # the operators' images, keyed by module name: the first two TVConv layers' affinity maps and filters
    ops = sorted(t for t in images if t.startswith("backbone."))
    assert "roc/orl" in images and len(ops) == 4 and {t.rsplit("/", 1)[1] for t in ops} == {"affinity", "filters"}
    out = summary(run)
    assert out["best"]["key"] == "val_mean_acc" and out["config"]["task"]["margin"]["name"] == "arcface"
    assert out["replacement"] > 0  # every depthwise conv became a TVConv
