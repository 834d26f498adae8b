"""Bad input to train.py ends in one line, `train.py: error: ...`, with no traceback, and train.log says why the run
stopped; a bug keeps its traceback."""
import pytest

from tests.engine.conftest import run_train


def one_line_error(proc) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: "), proc.stderr[-3000:]
    return line.removeprefix("train.py: error: ")


@pytest.mark.parametrize("args, message", [
    (["experiment=rednet50_imagenet"], "data.name=imagefolder needs data.root"),
    (["data=fashion_mnist", "data.root=/nonexistent"], "Fashion-MNIST not found: looked for"),
    (["op=ddf", "+op.foo=1"], "operator 'ddf' got unknown option(s) ['foo']"),
    (["experiment=finetune_timm_ddf"], "offline, give a weights file with model.pretrained_file=<path>"),
])
def test_user_error_is_one_line_and_logged(tmp_path, args, message):
    run = tmp_path / "run"
    proc = run_train(args, run, check=False, env={"HF_HUB_OFFLINE": "1"}, tiny=False)
    error = one_line_error(proc)
    assert message in error
    assert f"stopped: {error}" in (run / "train.log").read_text()


def test_incompatible_layer_under_on_incompatible_error(tmp_path):
    """involution needs channels divisible by its group_channels: the default `error` names the layer and the fixes."""
    proc = run_train(["op=involution", "policy=all_3x3", "op.group_channels=48"], tmp_path / "run", check=False)
    assert "policy.on_incompatible=skip keeps this conv" in one_line_error(proc)
