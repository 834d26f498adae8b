"""Datasets for training and evaluation, classification and face sets alike:
`build_datasets(cfg.data) -> (train_ds, validation part, DataInfo)`.

Every dataset returns (normalised float CHW tensor, int label). Data is fetched once, before training, by
`make setup` (scripts/fetch_data.sh, data/fetch.py); a missing dataset raises an error naming that command.
"""
from omegaconf import OmegaConf
from torch.utils.data import Subset

from .base import DataInfo, subset_indices
from .config import DataConfig
from .face.build import FACE_DATASETS
from .imagefolder import build_imagefolder
from .mnist import build_fashion_mnist, build_mnist5k
from .synthetic import build_synthetic

__all__ = ["DATASETS", "DataConfig", "DataInfo", "build_datasets", "data_config"]

# name -> builder(cfg: DataConfig) -> (train_ds, validation part, DataInfo); the validation part is what the
# task evaluates on: a Dataset for classification, a list of verification PairSets for the face sets
DATASETS = {
    "fashion_mnist": build_fashion_mnist,
    "mnist5k": build_mnist5k,
    "imagefolder": build_imagefolder,
    "synthetic": build_synthetic,
    **FACE_DATASETS,
}


def data_config(cfg=None):
    """A DataConfig from a DataConfig, a DictConfig or a plain dict (missing keys take the defaults; an unknown
    key or a wrong type raises)."""
    if isinstance(cfg, DataConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg or {}))


def build_datasets(cfg):
    """The train and val datasets named by `cfg.name`, and what the model needs to know about them."""
    cfg = data_config(cfg)
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset data.name={cfg.name!r}; known: {', '.join(sorted(DATASETS))}")
    train, val, info = DATASETS[cfg.name](cfg)
    if cfg.num_classes is not None and cfg.num_classes != info.num_classes:
        raise ValueError(f"data.num_classes={cfg.num_classes} but the {cfg.name} data has {info.num_classes} "
                         "classes; leave data.num_classes null to take it from the data")
    if cfg.train_subset is not None:
        train = Subset(train, subset_indices(len(train), cfg.train_subset, cfg.seed).tolist())
    return train, val, info
