"""A checkpoint outside the training loop: its config, its network with the weights, its evaluation data and
transforms. Shared by scripts/validate.py (timm's validate.py) and scripts/predict.py (timm's inference.py).

A checkpoint is either a `train.py` checkpoint (`last.pt`/`best.pt`: the weights, the EMA weights and the run's
config) or an official state_dict, whose keys `models.load_official` converts (RedNet, DDF-ResNet, DCD, TVConv).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig, OmegaConf
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import data as data_lib
from data.face.build import FACE_DATASETS
from data.face.transforms import face_tensor
from data.imagefolder import ImageFolderSet
from data.mnist import FASHION_MNIST_CLASSES
from models.official import OfficialKeysError, load_official
from . import checkpoint as ckpt_lib
from . import face  # noqa: F401  (registers task=face)
from .config import Config, ConfigError, override_key
from .distributed import DistInfo
from .tasks import build_task
from .trainer import autocast, build_network, data_loader, eval_batches, pick_device

# config groups whose option fills one node: `data=imagefolder` on the command line replaces the checkpoint's node
NODE_GROUPS = {"model": "model", "op": "op", "policy": "policy", "data": "data", "optim": "optim", "sched": "sched",
               "trainer": "trainer", "margin": "task.margin"}
GRAY_SETS = ("fashion_mnist", "mnist5k")  # gray images, repeated to `data.channels`
SHOWN_KEYS = 5  # keys named in an error about an official checkpoint


@dataclass
class ValidateConfig(Config):
    """`python scripts/validate.py`: train.py's config and what to validate."""
    checkpoint: str = MISSING              # best.pt/last.pt of train.py, or an official state_dict
    use_ema: bool = False                  # the EMA weights of a train.py checkpoint
    results_file: Optional[str] = None     # JSON with the metrics (a list, one entry per checkpoint, with -m)


@dataclass
class PredictConfig(Config):
    """`python scripts/predict.py`: train.py's config and what to predict."""
    checkpoint: str = MISSING
    use_ema: bool = False
    inputs: str = MISSING                  # an image file, a folder (searched recursively) or a glob
    topk: int = 5                          # classification: labels per image
    output: str = "predictions.csv"        # CSV; a face model writes <output>.npy and the paths to <output>.txt


class Checkpoint:
    """A checkpoint file, read without running code; a missing or unreadable file is a `ConfigError`."""

    def __init__(self, path: str):
        self.path = path
        if not Path(path).is_file():
            raise ConfigError(f"checkpoint={path}: no such file; give a best.pt/last.pt written by train.py "
                              "(outputs/<name>/<run>/checkpoints/) or an official state_dict")
        try:
            self.state = ckpt_lib.load(path)
        except ckpt_lib.CheckpointError as e:  # damaged, or holding more than tensors and plain containers
            raise ConfigError(f"checkpoint={e}") from None
        if not isinstance(self.state, dict):
            raise ConfigError(f"checkpoint={path} holds a {type(self.state).__name__}, not a state_dict or a "
                              "train.py checkpoint")
        self.trained = isinstance(self.state.get("model"), dict) and isinstance(self.state.get("config"), str)

    def config(self, cfg: DictConfig, overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> DictConfig:
        """The config to build and evaluate the network with.

        Official state_dict: `cfg`, the command line's config (`model=` names the architecture). train.py
        checkpoint: the run's config, with what the command line sets on top: a group (`data=imagefolder`)
        replaces that node, a key (`data.root=...`, `debug=fdr`'s keys) that value. `compose(overrides)` composes
        the script's config; the command line must not build another network than the checkpoint's.
        """
        cfg = _without_script_keys(cfg)
        if not self.trained:
            return cfg
        script = [o for o in overrides if override_key(o) in _script_keys()]
        groups = [o for o in overrides if override_key(o) in NODE_GROUPS]
        base = _without_script_keys(compose(script + groups))
        run = OmegaConf.create(self.state["config"])
        for o in groups:
            path = NODE_GROUPS[override_key(o)]
            OmegaConf.update(run, path, OmegaConf.select(base, path), merge=False, force_add=True)
        before = _leaves(base)
        for key, value in _leaves(cfg).items():
            if before.get(key, MISSING) != value:
                OmegaConf.update(run, key, value, merge=False, force_add=True)
        saved, asked, diffs = ckpt_lib.network_diffs(OmegaConf.create(self.state["config"]), run)
        diffs = [d for d in diffs if not d.startswith("data.")]  # another dataset of the same classes is fine
        if diffs:
            raise ConfigError(f"checkpoint={self.path} holds {saved}, the command asks for {asked} "
                              f"({'; '.join(diffs)}); a train.py checkpoint brings its own config: drop "
                              "model=/op=/policy=/task= or give the checkpoint of that network")
        return run

    def load_into(self, model: nn.Module, backbone: nn.Module, cfg: DictConfig, use_ema: bool) -> None:
        """Load the weights: a train.py checkpoint's into `model`, an official state_dict's into `backbone`."""
        if not self.trained:
            if use_ema:
                raise ConfigError(f"use_ema=true needs a train.py checkpoint; checkpoint={self.path} is a "
                                  "state_dict: drop use_ema")
            try:
                load_official(backbone, self.state)
            except OfficialKeysError as e:
                raise ConfigError(f"checkpoint={self.path} does not fit model={cfg.model.name}: missing keys "
                                  f"{_first(e.missing)}; unexpected keys {_first(e.unexpected)}; keys of another "
                                  f"shape {_first(e.mismatched)}; give the model= (and op=) of the checkpoint's "
                                  "architecture") from None
            except ValueError as e:
                raise ConfigError(f"checkpoint={self.path} is not a train.py checkpoint, so it is read as an "
                                  f"official state_dict, but {e}; name its architecture with model=, e.g. "
                                  "model=rednet50") from None
            return
        state = self.state.get("ema") if use_ema else self.state["model"]
        if state is None:
            raise ConfigError(f"use_ema=true but checkpoint={self.path} holds no EMA weights (the run had "
                              "trainer.model_ema=false): drop use_ema")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            problem = " ".join(str(e).split())
            raise ConfigError(f"checkpoint={self.path} does not fit the network built from its config "
                              f"({problem[:300]}); keep the run's data classes (data.num_classes) and model code") \
                from None


def _script_keys() -> set[str]:
    config = {f.name for f in dataclasses.fields(Config)}
    return {f.name for cls in (ValidateConfig, PredictConfig) for f in dataclasses.fields(cls)} - config


def _without_script_keys(cfg: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k not in _script_keys()])


def _leaves(cfg: DictConfig) -> dict:
    """`{dotted key: value}` of every leaf (lists count as leaves), interpolations resolved."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
    return f"{len(keys)}" + (f" ({shown})" if keys else "")


class Loaded:
    """The checkpoint's network (eval mode, on its device) with its task, data description and validation part."""

    def __init__(self, cfg: DictConfig, ckpt: Checkpoint, use_ema: bool):
        t = cfg.trainer
        if t.threads:
            torch.set_num_threads(t.threads)
        self.cfg, self.device = cfg, pick_device(t.device)
        _, self.val, self.info = data_lib.build_datasets(cfg.data)
        self.task = build_task(OmegaConf.to_container(cfg.task, resolve=True), self.info)
        model, backbone, _ = build_network(cfg, self.task, self.info)
        ckpt.load_into(model, backbone, cfg, use_ema)
        model = model.to(self.device).eval()
        self.model = model.to(memory_format=torch.channels_last) if t.channels_last else model
        self.autocast = autocast(t, self.device)
        self.is_face = cfg.data.name in FACE_DATASETS

    def eval_data(self):
        """What the trainer evaluates on: the same loader (batches, order, `trainer.limit_val_batches`)."""
        make = functools.partial(data_loader, cfg=self.cfg, dist=DistInfo(), device=self.device, shuffle=False,
                                 limit=eval_batches(self.cfg))
        return self.task.eval_data(self.val, make)

    def evaluate(self, eval_data) -> dict:
        return self.task.evaluate(self.model, eval_data, self.device, self.autocast, DistInfo(),
                                  self.cfg.trainer.channels_last)

    def class_names(self) -> list[str]:
        """The dataset's class names: Fashion-MNIST's, the ImageFolder's folders (ImageNet synsets as timm's
        ImageNetInfo describes them), else the class indices."""
        name, n = self.cfg.data.name, self.info.num_classes
        if name == "fashion_mnist":
            return list(FASHION_MNIST_CLASSES)
        if isinstance(self.val, ImageFolderSet):
            classes = list(self.val.classes)
            if all(re.fullmatch(r"n\d{8}", c) for c in classes):
                from timm.data import ImageNetInfo
                return [ImageNetInfo().label_name_to_description(c) for c in classes]
            return classes
        return [str(k) for k in range(n)]

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """A decoded image → the network input, as the validation data is prepared: timm's eval transform for
        ImageFolder, the face sets' `face_tensor`, and for the in-memory sets their tensor pipeline ([0, 1]
        pixels, bilinear resize to the input size, channels repeated, normalised)."""
        info, data_cfg = self.info, self.cfg.data
        if isinstance(self.val, ImageFolderSet):
            return lambda im: self.val.transform(im.convert(self.val.mode))
        if self.is_face:
            return lambda im: face_tensor(np.array(im.convert("RGB")), info.input_size[0], "pad", info.in_chans,
                                          info.mean, info.std)
        mode = "L" if data_cfg.name in GRAY_SETS or info.in_chans == 1 else "RGB"
        mean, std = torch.tensor(info.mean).view(-1, 1, 1), torch.tensor(info.std).view(-1, 1, 1)

        def transform(im: Image.Image) -> torch.Tensor:
            x = pil_to_tensor(im.convert(mode)).float().div_(255)
            if x.shape[-2:] != tuple(info.input_size):
                x = F.interpolate(x[None], tuple(info.input_size), mode="bilinear", antialias=True)[0]
            return (x.expand(info.in_chans, -1, -1) - mean) / std
        return transform


__all__ = ["Checkpoint", "Loaded", "PredictConfig", "ValidateConfig"]
