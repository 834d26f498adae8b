"""Schema of the `data` config group (configs/data/*.yaml); the engine composes it into the top-level config, so a
misspelt key or a wrong type fails at compose time. Augmentation names follow timm's flags (`aa`, `reprob`, ...)."""
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from dynconv.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value or command line that cannot run; found before any work is done (one-line message)."""


class MissingDataError(ConfigError, FileNotFoundError):
    """The data the config names is not on disk (the message says where it was looked for and how to get it)."""


Rule = tuple[Callable[[float], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
PROBABILITY: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")


def check_ranges(obj, group: str, rules: dict[str, Rule]) -> None:
    """Raise `ConfigError` naming `<group>.<key>` for the first value (not None) outside its range."""
    for name, (ok, need) in rules.items():
        value = getattr(obj, name)
        if value is not None and not ok(value):
            raise ConfigError(f"{group}.{name}={value!r}: must be {need}")


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # data.DATASETS: fashion_mnist | mnist5k | imagefolder | synthetic; faces: data.face
    root: Optional[str] = None  # data folder; null: the fetched copy (.cache/data) or the dataset's usual place
    num_classes: Optional[int] = None  # null: taken from the data; a given value is checked against it
    channels: int = 1  # 1 (gray) or 3 (RGB; gray images are repeated)
    img_size: Optional[int] = None  # square input side; null: the native size (28 for the MNIST sets)
    mean: Optional[List[float]] = None  # per channel (or one value for all); null: the dataset's own statistics
    std: Optional[List[float]] = None  # as mean
    train_subset: Optional[int] = None  # use a seeded random subset of this many training images (fast runs)
    seed: int = 0  # seeds train_subset, the mnist5k split and the synthetic images, independent of the run seed
    augment: bool = True  # train-time augmentation (the in-memory sets: padded random crop + hflip)
    crop_padding: int = 2  # zero padding before the random crop (in-memory sets: native-size px; faces: input px)

    # loader
    batch_size: int = 128  # per process
    workers: int = 2  # DataLoader processes; 0 loads in the main process (best for the small in-memory sets)
    pin_memory: bool = True  # page-locked host batches for faster copies to CUDA (only used on CUDA)
    persistent_workers: bool = True  # keep worker processes between epochs (only when workers > 0)

    # imagefolder transforms: timm's create_transform
    aa: Optional[str] = None  # RandAugment / AutoAugment policy string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing probability
    remode: str = "pixel"  # random erasing fill: pixel (per-pixel noise) | rand (per-channel) | const
    recount: int = 1  # random erasing: up to this many boxes per image (1..recount, timm's re_count)
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.5  # horizontal flip probability (all sets with augment)
    color_jitter: Optional[float] = 0.4  # colour jitter strength; null: none (ignored when aa is set, as in timm)
    interpolation: str = "bilinear"  # resize interpolation: bilinear | bicubic | nearest | random
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then center-crop img_size
    on_bad_image: str = "error"  # imagefolder, a file PIL cannot decode: error (stop, naming it) | skip (log a count)

    # synthetic
    train_size: int = 512  # number of training images
    val_size: int = 128  # number of validation images

    # face verification (data/face, data.face.FACE_DATASETS)
    val_sets: List[str] = field(default_factory=list)  # .bin files or pairs.txt lists; a bare name: <root>/<name>.bin
    pairs_root: Optional[str] = None  # images folder of the pairs.txt lists; null: each list's own folder
    num_test: int = 10  # orl: identities held out per fold (40 // num_test folds)
    fold: int = 0  # orl: which block of the seeded identity permutation is held out

    def __post_init__(self):
        check_ranges(self, "data", dict(
            num_classes=POSITIVE, img_size=POSITIVE, train_subset=POSITIVE, crop_padding=NON_NEGATIVE,
            batch_size=POSITIVE, workers=NON_NEGATIVE, reprob=PROBABILITY, recount=POSITIVE, hflip=PROBABILITY,
            color_jitter=NON_NEGATIVE, crop_pct=(lambda v: 0 < v <= 1, "in (0, 1]"), train_size=POSITIVE,
            val_size=POSITIVE, num_test=POSITIVE, fold=NON_NEGATIVE,
            channels=(lambda v: v in (1, 3), "1 (gray) or 3 (RGB)"),
            on_bad_image=(lambda v: v in ("error", "skip"), "error or skip")))
