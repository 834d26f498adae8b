"""Precise BN (engine/precise_bn.py, `trainer.precise_bn_batches`)."""
import torch
import torch.nn as nn

from engine import checkpoint as ckpt_lib
from engine.precise_bn import recompute_bn_stats

from .conftest import run_train


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))


def test_statistics_are_the_average_over_the_batches_under_the_current_weights():
    net = _net().eval()
    bn1, bn2 = net[1], net[4]
    bn1.running_mean.fill_(7.0), bn1.running_var.fill_(9.0)  # stale statistics
    bn1.num_batches_tracked.fill_(123)
    batches = [(torch.randn(6, 3, 8, 8) * (i + 1), None) for i in range(4)]
    weights = {k: v.clone() for k, v in net.named_parameters()}

    used = recompute_bn_stats(net, batches, num_batches=3)

    assert used == 3
    assert not net.training and bn1.momentum == 0.1 and bn1.num_batches_tracked.item() == 123
    assert all(torch.equal(v, weights[k]) for k, v in net.named_parameters())
    # oracle: the mean over the first 3 batches of each batch's mean and unbiased variance of bn1's input
    feats = [net[0](x) for x, _ in batches[:3]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in feats]).mean(0)
    torch.testing.assert_close(bn1.running_mean, mean)
    torch.testing.assert_close(bn1.running_var, var)
    # the second layer sees the first one normalised with batch statistics, as in training
    with torch.no_grad():
        net.train()
        f2 = [net[3](net[2](nn.functional.batch_norm(f, None, None, bn1.weight, bn1.bias, training=True)))
              for f in feats]
        net.eval()
    torch.testing.assert_close(bn2.running_mean, torch.stack([f.mean((0, 2, 3)) for f in f2]).mean(0))


def test_no_batches_keeps_the_old_statistics():
    net = _net()
    net[1].running_mean.fill_(3.0)
    assert recompute_bn_stats(net, [], num_batches=5) == 0
    assert torch.all(net[1].running_mean == 3.0) and net.training
    assert recompute_bn_stats(nn.Linear(2, 2), [(torch.randn(1, 2), None)], num_batches=1) == 0  # no BN: no-op


def test_train_py_recomputes_statistics_without_touching_training(tmp_path):
    """Same seed with and without `trainer.precise_bn_batches`: equal weights (the extra loader does not draw
    from the training stream), different BN statistics, and the log says how many batches were used."""
    args = ["trainer.epochs=1", "trainer.limit_train_batches=3"]
    plain, precise = tmp_path / "plain", tmp_path / "precise"
    run_train(args, plain)
    proc = run_train(args + ["trainer.precise_bn_batches=4"], precise)
    assert "precise BN: statistics of" in proc.stdout + proc.stderr
    assert "over 4 batches" in proc.stdout + proc.stderr
    a = ckpt_lib.load(plain / "checkpoints" / "last.pt")["model"]
    b = ckpt_lib.load(precise / "checkpoints" / "last.pt")["model"]
    stats = [k for k in a if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(a[k], b[k]) for k in a if k not in stats)
    assert all(not torch.equal(a[k], b[k]) for k in stats)
