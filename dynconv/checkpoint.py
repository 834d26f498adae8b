"""Loading a checkpoint without running code (`weights_only=True`), with a one-line error naming the file.

Here, in the library, so that the paper models' `pretrained_file=` reads weights the same way installed as in a
clone; the training framework's checkpoints use the same `load`.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from .errors import UserError


class CheckpointError(UserError, ValueError):
    """A file that cannot be read as a checkpoint: damaged, not written by `torch.save`, or holding more than tensors
    and plain containers. The message is one line naming the file."""


def load(path: str | Path, map_location="cpu", mmap: bool = False):
    """Load a checkpoint without executing code (`weights_only=True`). A file that cannot be read so raises
    `CheckpointError` in one line naming it (torch's own text would suggest turning the check off)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        ref = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if ref:
            raise CheckpointError(
                f"{path} is unsafe: it holds a reference to {ref.group(1)}. Only tensors and plain containers are "
                "loaded, so a checkpoint cannot run code; use a last.pt/best.pt written by train.py or a state_dict "
                "saved with torch.save") from None
        raise CheckpointError(
            f"{path} is damaged or not a checkpoint: PyTorch cannot read it as one ({Path(path).stat().st_size} bytes; "
            "a full disk or an interrupted copy cuts files short)") from None
