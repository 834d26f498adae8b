"""insightface training data (`train.rec` + `train.idx`, MXNet RecordIO) read without mxnet.

Byte format (dmlc `recordio.h`, mxnet `recordio.py`):
- `.idx`: text lines `key<TAB>byte offset`.
- `.rec`: chunks `uint32 magic 0xced7230a | uint32 (cflag << 29 | length) | data | zero pad to 4`.
  A record whose data holds the magic number at a 4-byte-aligned position is split there into
  chunks with cflag 1 (start), 2 (middle), 3 (end); the reader re-inserts the magic between them.
- record = `IfQQ` header (flag uint32, label float32, id uint64, id2 uint64), then `flag` float32
  labels when flag > 0 (the header label is then 0), then the encoded image.
- insightface: record 0 is a meta header (flag > 0, empty payload) with label [a, b]: keys 1..a-1
  are images, keys a..b-1 hold each identity's image-key range. Without it every key is an image.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .transforms import FaceDataset, decode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CHUNK = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


def pack(label, payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Record bytes for a float label or a label vector (as mxnet's `recordio.pack`)."""
    vec = np.atleast_1d(np.asarray(label, np.float32))
    if np.ndim(label) == 0:
        return _HEADER.pack(0, float(label), id, id2) + payload
    return _HEADER.pack(len(vec), 0.0, id, id2) + vec.tobytes() + payload


def unpack(record: bytes) -> tuple[float | np.ndarray, int, int, bytes]:
    """Record bytes -> (label: float, or float32 vector when the header's flag > 0, id, id2, payload)."""
    flag, label, id_, id2 = _HEADER.unpack_from(record)
    start = _HEADER.size + 4 * flag
    if flag > 0:
        label = np.frombuffer(record, np.float32, count=flag, offset=_HEADER.size).copy()
    return label, id_, id2, record[start:]


def write_record(f, record: bytes) -> None:
    """Append one record to an open `.rec` file, split at aligned magic numbers as dmlc does."""
    cuts = [i for i in range(0, len(record) - 3, 4) if record[i:i + 4] == _MAGIC_BYTES]
    starts, ends = [0] + [i + 4 for i in cuts], cuts + [len(record)]
    for n, (a, b) in enumerate(zip(starts, ends)):
        cflag = 0 if not cuts else 1 if n == 0 else 3 if n == len(cuts) else 2
        f.write(_CHUNK.pack(MAGIC, cflag << 29 | (b - a)) + record[a:b] + b"\0" * (-(b - a) % 4))


def write_indexed(rec_path, idx_path, records: dict[int, bytes]) -> None:
    """Write `{key: record}` as a `.rec` file and its `.idx` (fixtures, small conversions)."""
    with open(rec_path, "wb") as f, open(idx_path, "w") as idx:
        for key, record in records.items():
            idx.write(f"{key}\t{f.tell()}\n")
            write_record(f, record)


class IndexedRecordIO:
    """Random access to the records of a `.rec` through its `.idx`. The file is opened lazily
    per process, so DataLoader workers never share a file offset."""

    def __init__(self, rec_path, idx_path):
        self.rec_path = str(rec_path)
        self.offsets: dict[int, int] = {}
        with open(idx_path) as f:
            for line in f:
                if line.strip():
                    key, offset = line.split()
                    self.offsets[int(key)] = int(offset)
        size = os.path.getsize(self.rec_path)
        last = max(self.offsets, key=self.offsets.get, default=None)
        if last is not None and self.offsets[last] + _CHUNK.size > size:
            raise ValueError(f"{self.rec_path}: record {last} starts at byte {self.offsets[last]} of {idx_path}, "
                             f"past the end of the {size}-byte file; the .rec is truncated (copy it again) or the "
                             ".idx belongs to another .rec")
        self._file, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def _read_exact(self, n: int, key: int) -> bytes:
        data = self._file.read(n)
        if len(data) != n:
            raise ValueError(f"{self.rec_path}: record {key} is cut short ({len(data)} of {n} bytes at byte "
                             f"{self._file.tell() - len(data)}); the file is truncated: copy or download it again")
        return data

    def read(self, key: int) -> bytes:
        if self._pid != os.getpid():
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        self._file.seek(self.offsets[key])
        parts = []
        while True:
            magic, lrec = _CHUNK.unpack(self._read_exact(_CHUNK.size, key))
            if magic != MAGIC:
                raise ValueError(f"{self.rec_path}: bad magic at record {key}; is the .idx "
                                 "the one written with this .rec?")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            parts.append(self._read_exact(length, key))
            self._file.seek(-length % 4, os.SEEK_CUR)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)


class RecordFaces(FaceDataset):
    """Identity-labelled faces from `root/train.rec` + `root/train.idx` (insightface layout)."""

    def __init__(self, root, **face_kwargs):
        super().__init__(**face_kwargs)
        root = Path(root)
        rec, idx = root / "train.rec", root / "train.idx"
        if not (rec.is_file() and idx.is_file()):
            raise FileNotFoundError(f"{root} must hold train.rec and train.idx (insightface RecordIO)")
        self.records = IndexedRecordIO(rec, idx)
        meta = None
        if 0 in self.records.offsets:
            label, _, _, payload = unpack(self.records.read(0))
            meta = label if isinstance(label, np.ndarray) and not payload else None
        if meta is not None:
            first_id, end = (int(round(v)) for v in meta[:2])
            self.keys = list(range(1, first_id))
            self.num_classes = end - first_id
        else:
            self.keys = sorted(self.records.offsets)
            self.num_classes = 1 + max(self.label(k) for k in self.keys)

    def label(self, key: int) -> int:
        label, _, _, _ = unpack(self.records.read(key))
        return int(label[0] if isinstance(label, np.ndarray) else label)

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        label, _, _, payload = unpack(self.records.read(self.keys[index]))
        return decode_image(payload), int(label[0] if isinstance(label, np.ndarray) else label)
