"""Hydra's submitit launcher: a 2-run sweep through `hydra/launcher=submitit_local`, each run one job of two tasks
that train together through the DDP path (as one job per node with two GPUs would on SLURM)."""
import pytest

from tests.engine.conftest import compose_cfg, run_train, summary


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_run_as_one_two_process_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "data=mnist5k",
               "data.batch_size=16", "trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
               "optim.lr=0.05,0.02", f"hydra.sweep.dir={sweep}"])
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0", "1"]  # one folder per run: the second task of a job joined the first one's run
    for run, lr in zip(runs, (0.05, 0.02)):
        s = summary(sweep / run)
        assert s["config"]["optim"]["lr"] == lr and s["num_updates"] == 2 and s["epochs_done"] == 1
        assert "world size 2" in (sweep / run / "train.log").read_text()
    assert len([p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]) == 2  # two submitit jobs


def test_slurm_launcher_keys_and_one_task_per_gpu():
    cfg = compose_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                       "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=240",
                       "hydra.launcher.mem_gb=256"], hydra_cfg=True).hydra.launcher
    assert cfg._target_.endswith("SlurmLauncher") and cfg.partition == "gpu" and cfg.nodes == 2
    assert cfg.gpus_per_node == 8 and cfg.tasks_per_node == 8 and cfg.timeout_min == 240 and cfg.mem_gb == 256
    local = compose_cfg(["hydra/launcher=submitit_local"], hydra_cfg=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.tasks_per_node == 1  # a CPU job: one process


LAUNCHERS = ["basic", "joblib", "submitit_local", "submitit_slurm"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_experiment_composes_with_every_launcher(launcher):
    """An experiment file sets no launcher-specific key, so `hydra/launcher=` on the command line takes any suite
    anywhere (`Key 'n_jobs' not in 'SlurmQueueConf'` was the symptom)."""
    from omegaconf import OmegaConf

    from tests.experiments.conftest import EXPERIMENTS

    for experiment in EXPERIMENTS:
        cfg = compose_cfg([f"experiment={experiment}", f"hydra/launcher={launcher}"], hydra_cfg=True).hydra
        assert cfg.runtime.choices["hydra/launcher"] == launcher, experiment
        OmegaConf.to_container(cfg.launcher, resolve=True)
