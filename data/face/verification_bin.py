"""insightface verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...), loaded safely.

Format (insightface `lfw2pack.py` / `eval/verification.py::load_bin`):
a pickle of `(bins, issame)`, `bins` the 2N encoded image files (pair i = bins[2i], bins[2i+1]),
`issame` N bools. The shipped files were pickled by Python 2, so the images are `str` objects,
read here as bytes (`encoding="bytes"`). A pickle can run arbitrary code when loaded, so the
unpickler admits only plain data: bytes, str, lists, tuples, bools, numbers and None. The one
global it resolves is `_codecs.encode`, which a Python 3 pickle at protocol < 3 uses to rebuild
bytes; it is answered by a latin-1 encoder that accepts nothing else.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from .pairs import PairSet
from .transforms import EncodedFaces, decode_image

class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for an object other than plain data."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for `_codecs.encode` in protocol-2 pickles of bytes: `encode(str, 'latin1')`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin-1")


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        module = module.decode() if isinstance(module, bytes) else module
        name = name.decode() if isinstance(name, bytes) else name
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise UnsafePickleError(
            f"{self.source}: refusing to unpickle, it asks for `{module}.{name}`; a verification .bin "
            "may hold only bytes, lists, tuples, bools and numbers (loading other objects can run "
            "code). Re-create the file from the images with insightface's lfw2pack.py if you trust it.")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing to unpickle a persistent id")


def load_verification_bin(path) -> tuple[list[bytes], list[bool]]:
    """The encoded images (2N bytes objects) and the N same-identity flags of a `.bin` file."""
    with open(path, "rb") as f:
        obj = _DataOnlyUnpickler(io.BytesIO(f.read()), str(path)).load()
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    bins = [b.encode("latin-1") if isinstance(b, str) else b for b in bins]
    if not all(isinstance(b, bytes) for b in bins):
        raise ValueError(f"{path}: every image must be an encoded file (bytes)")
    if not all(isinstance(s, (bool, int)) and s in (0, 1) for s in issame):
        raise ValueError(f"{path}: the same/different flags must be bools")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected two per pair")
    return bins, [bool(s) for s in issame]


def read_verification_bin(path) -> tuple[list[np.ndarray], list[bool]]:
    """Decoded images (uint8 RGB, HWC) and same-identity flags of a verification `.bin` file."""
    bins, issame = load_verification_bin(path)
    return [decode_image(b) for b in bins], issame


def bin_pairset(path, name: str | None = None, **face_kwargs) -> PairSet:
    """A `PairSet` over a `.bin` file; images stay encoded in memory and are decoded on use."""
    bins, issame = load_verification_bin(path)
    pairs = np.arange(len(bins)).reshape(-1, 2)
    return PairSet(name or Path(path).stem, EncodedFaces(bins, **face_kwargs), pairs, issame)
