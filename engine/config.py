"""Structured config schema: the dataclasses every composed config is validated against.

`model`, `op`, `policy` and `task` are open dictionaries: their keys are the keyword arguments of the
model factory, the operator constructor, the replacement policy and the task, and are checked
against those signatures when the run is built (before any training), with errors that list the
valid names. Everything else is typed here: a misspelt key or a wrong type fails at compose time, and
`validate` (right after composing) refuses keys added with `+` and values out of range, naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.config import NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, DataConfig, check_ranges

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class OptimConfig:
    """Passed to timm's `create_optimizer_v2` (names as timm's train.py flags)."""
    opt: str = "sgd"                    # sgd | adamw | any timm optimizer name
    lr: Optional[float] = None          # None: lr_base * global_batch / lr_base_size
    lr_base: float = 0.1
    lr_base_size: int = 256
    momentum: float = 0.9
    nesterov: bool = True               # SGD only
    weight_decay: float = 1e-4
    filter_bias_and_bn: bool = True     # no weight decay on norm, bias and other 1-D parameters
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    lr_mult: Dict[str, float] = field(default_factory=dict)  # parameter-name glob -> lr multiplier (offset convs)
    clip_grad: Optional[float] = None   # None: no clipping
    clip_mode: str = "norm"             # norm | value | agc

    def __post_init__(self):
        check_ranges(self, "optim", dict(lr=NON_NEGATIVE, lr_base=NON_NEGATIVE, lr_base_size=POSITIVE,
                                         momentum=NON_NEGATIVE, weight_decay=NON_NEGATIVE, opt_eps=POSITIVE,
                                         clip_grad=POSITIVE))


@dataclass
class SchedConfig:
    """Passed to timm's `create_scheduler_v2`; `trainer.epochs` is the schedule length."""
    sched: str = "cosine"               # cosine | step | multistep | plateau | poly | tanh | none
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    warmup_prefix: bool = False
    min_lr: float = 0.0
    cooldown_epochs: int = 0            # extra epochs at min_lr after the schedule (timm semantics)
    decay_epochs: float = 30            # step: epochs between decays
    decay_milestones: List[int] = field(default_factory=lambda: [30, 60, 90])
    decay_rate: float = 0.1
    step_on_epochs: bool = False        # False: lr updated every optimizer step

    def __post_init__(self):
        check_ranges(self, "sched", dict(warmup_epochs=NON_NEGATIVE, warmup_lr=NON_NEGATIVE, min_lr=NON_NEGATIVE,
                                         cooldown_epochs=NON_NEGATIVE, decay_epochs=POSITIVE,
                                         decay_rate=NON_NEGATIVE))


@dataclass
class TrainerConfig:
    epochs: int = 10
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: bool = False
    amp_dtype: str = "bfloat16"         # bfloat16 | float16 (float16 uses a GradScaler on CUDA)
    channels_last: bool = False
    compile: bool = False               # torch.compile the model (before DDP)
    grad_accum_steps: int = 1
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    sync_bn: bool = False
    dist_bn: str = ""                   # at epoch end, "reduce" (average) or "broadcast" (rank 0) BN stats across ranks
    precise_bn_batches: int = 0         # before each evaluation, recompute BN statistics over N train batches (0: off)
    threads: Optional[int] = None       # torch intra-op threads of this process (null: torch's default)
    deterministic: bool = False
    eval_metric: str = "acc1"           # key of the validation metrics that picks best.pt
    eval_interval: int = 1              # epochs between evaluations (the last epoch is always evaluated)
    ckpt_interval: int = 0              # also write last.pt every N optimizer steps (0: epoch ends only)
    resume: Any = None                  # null | true (latest run) | run folder | .pt file
    log_interval: int = 50              # optimizer steps between train/loss points and log lines
    progress: bool = True               # tqdm progress bar on rank 0
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    dry_run: bool = False               # a few steps of train and eval, then stop
    count_flops: bool = True
    anneal_temperature: bool = True     # call the operators' temperature schedules (DY-Conv, ODConv)
    skip_nonfinite: int = 0             # skip up to N steps whose loss is NaN/inf (warning each), then stop

    def __post_init__(self):
        check_ranges(self, "trainer", dict(
            epochs=POSITIVE, grad_accum_steps=POSITIVE, model_ema_decay=PROBABILITY,
            precise_bn_batches=NON_NEGATIVE, threads=POSITIVE, eval_interval=POSITIVE, ckpt_interval=NON_NEGATIVE,
            log_interval=POSITIVE, limit_train_batches=POSITIVE, limit_val_batches=POSITIVE,
            skip_nonfinite=NON_NEGATIVE,
            amp_dtype=(lambda v: v in ("bfloat16", "float16"), "bfloat16 or float16"),
            dist_bn=(lambda v: v in ("", "reduce", "broadcast"), "'' (off), reduce or broadcast")))


@dataclass
class Config:
    model: Dict[str, Any] = field(default_factory=dict)
    op: Dict[str, Any] = field(default_factory=dict)
    policy: Dict[str, Any] = field(default_factory=dict)
    task: Dict[str, Any] = field(default_factory=dict)  # the task's options: its loss settings, task=face's margin
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 42
    name: str = "train"                  # experiment name, part of the run folder


def register_configs(schema_cls: type = Config) -> None:
    """Store the schema every composed config starts from (`schema` in train.yaml's defaults); a script with keys
    of its own (scripts/validate.py) passes a subclass of `Config` that adds them."""
    schema = OmegaConf.structured(schema_cls)
    # open groups: `model.<key>=` may set a builder option that the model's file leaves at its default
    for group in ("model", "op", "policy"):
        OmegaConf.set_struct(schema[group], False)
    ConfigStore.instance().store(name="schema", node=schema)
    if not OmegaConf.has_resolver("or"):  # `${or:a,b}`: a unless it is null (run-folder names)
        OmegaConf.register_new_resolver("or", lambda a, b: b if a is None else a)


CLOSED_GROUPS = {"optim": OptimConfig, "sched": SchedConfig, "trainer": TrainerConfig, "data": DataConfig}
# keys Hydra's `instantiate` (and its callbacks) act on: a config we replay or compose never carries them
INSTANTIATE_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def override_key(override: str) -> str:
    """The key (or group) a command-line override sets: `+optim.lr=0.1` → `optim.lr`."""
    return override.lstrip("+~").split("=", 1)[0]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(key: str, valid: list[str], group: str = "") -> ConfigError:
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"did you mean {group}{near[0]}?" if near else f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{group}{key}'; {hint}")


def validate(cfg: DictConfig) -> None:
    """Refuse keys outside the typed schema (also those added with `+`) and values out of range, naming the
    key; runs right after composing, before anything is built."""
    extra = set(cfg.keys()) - set(_fields(Config)) - {"hydra"}
    if extra:
        raise _unknown(sorted(extra)[0], _fields(Config))
    for group, cls in CLOSED_GROUPS.items():
        extra = set(cfg[group].keys()) - set(_fields(cls))
        if extra:
            raise _unknown(sorted(extra)[0], _fields(cls), f"{group}.")
        OmegaConf.to_object(cfg[group])  # the dataclass's __post_init__ checks the ranges


_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_GROUP = re.compile(r"[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*")


def _group_options(group: str) -> set[str]:
    """The options of a config group of the project's own `configs/` (its yaml files' stems)."""
    return {f.stem for f in (CONFIG_DIR / group).glob("*.yaml")}


def _option_problem(group: str, value: Any) -> str | None:
    """Why `value` is not an option (or a list of options) of `configs/<group>/`, or None."""
    options = value if isinstance(value, list) else [] if value is None else [value]  # `group=null` deselects
    if any(not isinstance(o, str) or not _OPTION.fullmatch(o) or ".." in o for o in options):
        return (f"{group}= must name an option of configs/{group}/ (a path, an interpolation or a structured "
                "value could load a config file from anywhere)")
    missing = [o for o in options if o not in _group_options(group)]
    if missing:
        return f"configs/{group}/ has no option {missing[0]!r} (options: {', '.join(sorted(_group_options(group)))})"
    return None


def _replay_problem(override: str) -> str | None:
    """Why an override read from a run folder must not be replayed, or None when it may.

    Parsed with Hydra's own override grammar, so the key, package and value checked are the ones Hydra acts on.
    A config group replays only as the name of one of the project's own options: a group value that is a path
    (`experiment=../../x/evil`) would compose any file, and a `# @package _global_` file can set anything,
    Hydra's callbacks included. Values of schema keys are data (a dataset root, a weights file) and may be paths.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(k in override for k in INSTANTIATE_KEYS):
        return f"instantiation keys ({', '.join(INSTANTIATE_KEYS)}) can run code"
    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException as err:
        return f"not a valid Hydra override ({str(err).splitlines()[0]})"
    key = parsed.key_or_group
    if key.split(".")[0].split("/")[0] == "hydra":
        return "hydra.* keys configure Hydra itself (callbacks can run code)"
    if key == "op.module" or (key == "op" and "module" in str(parsed.value())):
        return "op.module imports Python code (give it on the command line again if you trust it)"
    if parsed.package is not None:
        return "a package override (group@package) moves a config elsewhere in the tree"
    if parsed.is_sweep_override():
        return "a sweep (choice, range, glob) is not the value of one run"
    if _GROUP.fullmatch(key) and (CONFIG_DIR / key).is_dir():
        return None if parsed.is_delete() and parsed.value() is None else _option_problem(key, parsed.value())
    parts = key.split(".")
    if len(parts) == 1:
        ok = key in ("seed", "name")
    else:
        cls = CLOSED_GROUPS.get(parts[0])
        ok = parts[1] in _fields(cls) if cls else parts[0] in _fields(Config)
    return None if ok else f"{key} is not a key of the config schema"


def replayable_overrides(path: Path) -> list[str]:
    """The overrides saved in a run folder's `.hydra/overrides.yaml`, each checked: only config groups and keys
    of the schema are replayed; anything else stops the resume with the file and line."""
    if not path.exists():
        return []
    try:
        nodes = yaml.compose(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a YAML list of overrides ({str(err).splitlines()[0]}); restore it from the "
                          "run's .hydra/config.yaml or pass the overrides on the command line") from None
    if nodes is not None and not isinstance(nodes, yaml.SequenceNode):
        raise ConfigError(f"{path}:{nodes.start_mark.line + 1}: not a YAML list of overrides; restore it from the "
                          "run's .hydra/config.yaml or pass the overrides on the command line")
    items = [] if nodes is None else nodes.value
    for node in items:
        problem = _replay_problem(str(node.value)) if isinstance(node, yaml.ScalarNode) else "not a plain override"
        if problem:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: refusing to replay {node.value!r}: {problem}. "
                              "Remove that line to resume this run.")
    return [str(node.value) for node in items]
