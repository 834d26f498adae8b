"""Every experiment composes (each ablation suite also as `<suite>_full`), the recipes hold the official facts
(involution's mmcls config, ddfnet's README command and train.py, dcd's README and main.py), and every sweep
cell names real options: its model builds."""
import pytest
import yaml
from omegaconf import OmegaConf

import models
from tests.experiments.conftest import ABLATIONS, CONFIGS, EXPERIMENTS, RECIPES, choices, compose_cfg, sweep_params


def test_the_suites_and_recipes_exist():
    assert set(RECIPES) <= set(EXPERIMENTS)
    assert {f"ablation_{s}" for s in ("involution", "ddf", "tvconv", "dcd", "dk", "grid")} <= set(ABLATIONS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"], hydra_cfg=True)
    OmegaConf.resolve(cfg)
    if experiment in ABLATIONS:
        assert cfg.hydra.sweeper.params.seed == "0,1,2"  # mean ± std over at least 3 seeds


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_full_scale_is_the_paper_size(experiment):
    small = compose_cfg([f"experiment={experiment}"])
    assert small.name == experiment
    full = compose_cfg([f"experiment={experiment}_full"])
    assert full.name == f"{experiment}_full"
    assert full.data.name in ("imagefolder", "face_rec") and full.data.root is None  # required on the command line
    assert full.data.train_subset is None and full.trainer.epochs > small.trainer.epochs
    assert full.model.get("width", 1.0) == 1.0 and not full.model.get("small_input", False)
    assert full.trainer.threads is None and small.trainer.threads == 1
    full_hydra = compose_cfg([f"experiment={experiment}_full"], hydra_cfg=True).hydra
    assert full_hydra.launcher._target_.endswith("BasicLauncher")  # one paper-size run at a time
    assert small_hydra(experiment).launcher._target_.endswith("JoblibLauncher")  # one small run per core
    assert full_hydra.sweeper.params == small_hydra(experiment).sweeper.params


def small_hydra(experiment):
    return compose_cfg([f"experiment={experiment}"], hydra_cfg=True).hydra


def test_every_experiment_file_puts_self_last():
    for path in sorted(CONFIGS.glob("experiment/*.yaml")):
        defaults = yaml.safe_load(path.read_text())["defaults"]
        assert defaults[-1] == "_self_", path.name


RECIPE_FACTS = {
    "rednet50_imagenet": {
        "model.name": "rednet50", "optim.lr": 0.8, "optim.nesterov": True, "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4, "optim.filter_bias_and_bn": False, "sched.sched": "cosine",
        "sched.warmup_epochs": 5, "sched.warmup_lr": 0.25 * 0.8, "sched.min_lr": 0.0, "trainer.epochs": 130,
        "task.smoothing": 0.1, "data.aa": None, "data.reprob": 0.0, "task.mixup": 0.0},
    "ddf_resnet50_imagenet": {
        "model.name": "ddf_mul_resnet50", "optim.lr": 0.4, "optim.nesterov": True, "optim.weight_decay": 1e-4,
        "optim.filter_bias_and_bn": True, "sched.sched": "cosine", "trainer.epochs": 120,
        "sched.cooldown_epochs": 10, "sched.warmup_epochs": 5, "sched.warmup_lr": 1e-4, "sched.min_lr": 1e-5,
        "data.aa": "rand-m7-mstd0.5-inc1", "data.reprob": 0.4, "data.remode": "pixel", "data.recount": 3,
        "trainer.dist_bn": "reduce", "task.smoothing": 0.1, "task.mixup": 0.0},
    "dcd_resnet50_imagenet": {
        "model.name": "resnet50_dcd", "model.drop_rate": 0.1, "optim.lr": 0.1, "optim.nesterov": False,
        "optim.weight_decay": 1e-4, "optim.filter_bias_and_bn": False, "sched.sched": "multistep",
        "sched.decay_milestones": [30, 60, 90], "sched.decay_rate": 0.1, "sched.warmup_epochs": 0,
        "trainer.epochs": 120, "task.smoothing": 0.1, "task.mixup": 0.2, "task.mixup_ramp_epochs": 100,
        "data.batch_size": 256},
    "dcd_mobilenetv2_imagenet": {
        "model.name": "mobilenetv2_dcd", "model.dropout": 0.2, "optim.lr": 0.1, "optim.nesterov": False,
        "optim.weight_decay": 2e-5, "optim.filter_bias_and_bn": False, "sched.sched": "cosine",
        "sched.step_on_epochs": False, "sched.warmup_epochs": 0, "trainer.epochs": 300, "task.smoothing": 0.1,
        "task.mixup": 0.2, "task.mixup_ramp_epochs": 100, "data.batch_size": 512},
}
# global batch of the official runs = per-process batch x the processes the config's comment names
GLOBAL_BATCH = {"rednet50_imagenet": (2048, 8), "ddf_resnet50_imagenet": (1024, 8)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_holds_the_official_facts(recipe):
    cfg = compose_cfg([f"experiment={recipe}"])
    for key, want in RECIPE_FACTS[recipe].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, f"{recipe}: {key}={got}"
    assert cfg.name == recipe and cfg.data.name == "imagefolder" and cfg.data.root is None and cfg.data.img_size == 224
    if recipe in GLOBAL_BATCH:
        total, procs = GLOBAL_BATCH[recipe]
        assert cfg.data.batch_size * procs == total


def _cells(experiment):
    """One override list per sweep cell: each non-seed parameter's choices, the others at their first choice."""
    params = {k: choices(k, v) for k, v in sweep_params(experiment).items() if k != "seed"}
    for key, opts in params.items():
        rest = [o[0] for k, o in params.items() if k != key]
        for opt in opts:
            yield [*rest, opt]


CELLS = [(e, cell) for e in ABLATIONS for cell in _cells(e)]


@pytest.mark.parametrize("experiment, cell", CELLS, ids=[f"{e}:{' '.join(c)}" for e, c in CELLS])
def test_sweep_cell_builds(experiment, cell):
    """The swept options are real: the cell's model builds with them at the suite's input size."""
    cfg = compose_cfg([f"experiment={experiment}", *cell])
    to_dict = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    size = cfg.data.img_size or 28  # Fashion-MNIST's native size
    face = cfg.task.name == "face"
    model, report = models.build(to_dict(cfg.model), to_dict(cfg.op), to_dict(cfg.policy),
                                 num_classes=None if face else 10, in_chans=cfg.data.channels,
                                 input_size=(size, size))
    if cfg.op.name not in (None, "conv"):
        placed = [r for r in report if r["op"] == cfg.op.name]
        assert placed, report[:2]
        if cfg.policy.name not in ("deep_only", "shallow_only"):  # placement policies leave other slots plain
            assert len(placed) == len(report), report[:2]
