"""optim.lr_mult: parameter groups whose learning rate is a fixed multiple of the schedule's."""
import pytest
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from engine.trainer import param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)
        self.rotation_conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(2)


def test_groups_split_by_decay_and_multiplier():
    groups = param_groups(Net(), 1e-4, True, {"rotation_conv.*": 0.01})
    by_key = {(g["weight_decay"], g["lr_scale"]): sorted(p.shape for p in g["params"]) for g in groups}
    assert by_key == {
        (1e-4, 1.0): [torch.Size([2, 2, 3, 3])],
        (0.0, 1.0): [torch.Size([2]), torch.Size([2]), torch.Size([2])],  # conv bias, bn weight and bias
        (1e-4, 0.01): [torch.Size([4, 2, 3, 3])],
        (0.0, 0.01): [torch.Size([4])],
    }


@pytest.mark.parametrize("step_on_epochs", [False, True])
def test_timm_schedule_applies_the_multiplier_from_the_first_step(step_on_epochs):
    """The lr of a multiplied group follows the schedule times its multiplier, at every point of the schedule."""
    net = Net()
    groups = lambda m: param_groups(m, 0.0, False, {"rotation_conv.*": 0.1})  # noqa: E731
    opt = create_optimizer_v2(net, opt="sgd", lr=0.5, momentum=0.9, param_group_fn=groups)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=4, updates_per_epoch=2, step_on_epochs=step_on_epochs)
    sched.step(0)
    sched.step_update(num_updates=0)
    for update in range(8):
        lrs = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
        assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0]) and lrs[1.0] > 0
        if update == 0:
            assert lrs[1.0] == pytest.approx(0.5)
        sched.step_update(num_updates=update + 1)
        if (update + 1) % 2 == 0:
            sched.step((update + 1) // 2)


def test_readme_lr_mult_override_parses_and_applies():
    """The fine-tune command of README.md: its `optim.lr_mult=` override passes Hydra's grammar, keeps the globs in
    order, and gives convnext_nano's depthwise convs and head the full lr and the rest 0.1x."""
    import shlex
    from pathlib import Path

    import timm

    from tests.engine.conftest import compose_cfg

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    override = next(tok for line in readme.splitlines() if "optim.lr_mult=" in line
                    for tok in shlex.split(line.rstrip("\\")) if "optim.lr_mult=" in tok)
    lr_mult = dict(compose_cfg([override]).optim.lr_mult)
    assert list(lr_mult) == ["*conv_dw*", "head.fc.*", "*"]
    net = timm.create_model("convnext_nano", num_classes=10)
    scale = {id(p): g["lr_scale"] for g in param_groups(net, 0.0, False, lr_mult) for p in g["params"]}
    for name, p in net.named_parameters():
        want = 1.0 if ".conv_dw." in name or name.startswith("head.fc.") else 0.1
        assert scale[id(p)] == want, name


@pytest.mark.parametrize("overrides, warns", [
    (["sched=cosine", "sched.warmup_epochs=5", "sched.cooldown_epochs=10"], True),  # 2 epochs: 12 run, 10 at min_lr
    (["sched=cosine", "sched.warmup_epochs=5", "sched.cooldown_epochs=10", "trainer.epochs=100"], False),
    (["sched=cosine", "sched.warmup_epochs=3"], True),
    (["sched=none", "sched.warmup_epochs=3"], False),
    ([], False),
])
def test_a_schedule_longer_than_the_run_is_flagged(overrides, warns):
    from engine.trainer import schedule_warning
    from tests.engine.conftest import compose_cfg

    cfg = compose_cfg(overrides)
    warning = schedule_warning(cfg.sched, cfg.trainer.epochs)
    assert (warning is not None) == warns
    if warns:
        assert f"trainer.epochs={cfg.trainer.epochs}" in warning
        assert f"trains {cfg.trainer.epochs + cfg.sched.cooldown_epochs} epochs" in warning
