"""insightface RecordIO (train.rec + train.idx) without mxnet, on fixtures written in the byte format."""
import io
import pickle
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data.config import DataConfig
from data.face.build import FACE_DATASETS
from data.face.recordio import MAGIC, IndexedRecordIO, RecordFaces, pack, unpack, write_indexed, write_record

MAGIC_LE = b"\x0a\x23\xd7\xce"


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless, so decoded pixels can be compared exactly
    return buf.getvalue()


def faces(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(n)]


def test_chunk_bytes_follow_dmlc():
    f = io.BytesIO()
    write_record(f, b"abcde")
    assert f.getvalue() == MAGIC_LE + struct.pack("<I", 5) + b"abcde\0\0\0"
    # an aligned magic number in the data splits the record: start (cflag 1), middle (2), end (3);
    # two magics in a row leave an empty middle chunk
    f = io.BytesIO()
    write_record(f, b"wxyz" + MAGIC_LE + MAGIC_LE + b"q")
    assert f.getvalue() == (MAGIC_LE + struct.pack("<I", 1 << 29 | 4) + b"wxyz"
                            + MAGIC_LE + struct.pack("<I", 2 << 29 | 0)
                            + MAGIC_LE + struct.pack("<I", 3 << 29 | 1) + b"q\0\0\0")
    f = io.BytesIO()
    write_record(f, b"w" + MAGIC_LE + b"xyz")  # unaligned: not split
    assert f.getvalue() == MAGIC_LE + struct.pack("<I", 8) + b"w" + MAGIC_LE + b"xyz"
    assert struct.unpack("<I", MAGIC_LE)[0] == MAGIC


def test_pack_unpack_header_layout():
    rec = pack(7.0, b"IMG", id=3, id2=4)
    assert rec == struct.pack("<IfQQ", 0, 7.0, 3, 4) + b"IMG"
    assert unpack(rec) == (7.0, 3, 4, b"IMG")
    rec = pack([2.0, 5.0], b"IMG")
    assert rec == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 2.0, 5.0) + b"IMG"
    label, _, _, payload = unpack(rec)
    assert label.tolist() == [2.0, 5.0] and payload == b"IMG"


def write_insightface_fixture(root, images, labels):
    """insightface layout: record 0 = meta [first identity key, end]; images 1..n; one record per identity
    with its [start, end) image-key range. One image's id field holds the magic number (a split record)."""
    n, ids = len(images), sorted(set(labels))
    first = n + 1
    records = {0: pack([first, first + len(ids)], b"")}
    for k, (img, y) in enumerate(zip(images, labels), 1):
        records[k] = pack(float(y), png(img), id=MAGIC if k == 2 else k)
    for j, y in enumerate(ids):
        keys = [k for k, lab in enumerate(labels, 1) if lab == y]
        records[first + j] = pack([keys[0], keys[-1] + 1], b"")
    write_indexed(root / "train.rec", root / "train.idx", records)
    return records


def test_reader_returns_the_written_records(tmp_path):
    images, labels = faces(5), [0, 0, 1, 2, 2]
    records = write_insightface_fixture(tmp_path, images, labels)
    assert MAGIC_LE in records[2][:24]  # the split case is exercised
    reader = IndexedRecordIO(tmp_path / "train.rec", tmp_path / "train.idx")
    assert sorted(reader.offsets) == sorted(records)
    for key, rec in records.items():
        assert reader.read(key) == rec
    lines = (tmp_path / "train.idx").read_text().splitlines()
    assert lines[0] == "0\t0" and all(len(line.split("\t")) == 2 for line in lines)


def test_record_faces_with_meta_header(tmp_path):
    images, labels = faces(5), [0, 0, 1, 2, 2]
    write_insightface_fixture(tmp_path, images, labels)
    ds = RecordFaces(tmp_path, img_size=12, fit="pad", mean=(0.0,), std=(1 / 255,))
    assert len(ds) == 5 and ds.num_classes == 3 and ds.keys == [1, 2, 3, 4, 5]
    for i in range(5):
        img, y = ds.load(i)
        assert y == labels[i] and np.array_equal(img, images[i])
    x, y = ds[1]
    padded = np.zeros((12, 12, 3), np.uint8)
    padded[:, 1:11] = images[1]
    assert x.shape == (3, 12, 12) and np.allclose(x.permute(1, 2, 0).numpy(), padded, atol=1e-3)
    assert y == 0


def test_record_faces_without_meta_header(tmp_path):
    images, labels = faces(4, seed=1), [3, 1, 0, 3]
    write_indexed(tmp_path / "train.rec", tmp_path / "train.idx",
                  {k: pack([float(y), 9.0], png(img)) for k, (img, y) in enumerate(zip(images, labels))})
    ds = RecordFaces(tmp_path, img_size=16)
    assert ds.keys == [0, 1, 2, 3] and ds.num_classes == 4
    assert [ds.load(i)[1] for i in range(4)] == labels and np.array_equal(ds.load(3)[0], images[3])


def test_reader_pickles_for_workers_and_checks_magic(tmp_path):
    write_insightface_fixture(tmp_path, faces(3), [0, 1, 1])
    ds = RecordFaces(tmp_path, img_size=16)
    ds.load(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.records._file is None and np.array_equal(clone.load(2)[0], ds.load(2)[0])
    reader = IndexedRecordIO(tmp_path / "train.rec", tmp_path / "train.idx")
    reader.offsets[1] += 4
    with pytest.raises(ValueError, match="bad magic"):
        reader.read(1)
    with pytest.raises(FileNotFoundError, match="train.rec"):
        RecordFaces(tmp_path / "missing")


def test_build_face_rec_with_insightface_layout(tmp_path):
    """data.root holds train.rec/.idx and the evaluation sets named bare (`lfw` -> <root>/lfw.bin)."""
    images = faces(4)
    write_insightface_fixture(tmp_path, images, [0, 1, 1, 2])
    with open(tmp_path / "lfw.bin", "wb") as f:
        pickle.dump(([png(i) for i in images], [True, False]), f)
    cfg = SimpleNamespace(**{**vars(DataConfig()), "name": "face_rec", "root": str(tmp_path), "channels": 3,
                             "img_size": 16, "mean": [0.5], "std": [0.5], "val_sets": ["lfw"], "pairs_root": None})
    train, val_sets, info = FACE_DATASETS["face_rec"](cfg)
    assert len(train) == 4 and info.num_classes == 3 and train.hflip == 0.5
    assert [v.name for v in val_sets] == ["lfw"] and val_sets[0].issame.tolist() == [True, False]


def _truncate(path, nbytes):
    with open(path, "r+b") as f:
        f.truncate(nbytes)


def test_truncated_rec_names_the_file_and_the_record(tmp_path):
    """A cut inside the last record fails on that record's read; a cut before the last record fails at open."""
    records = write_insightface_fixture(tmp_path, faces(3), [0, 1, 1])
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    reader = IndexedRecordIO(rec, idx)
    last = max(reader.offsets, key=reader.offsets.get)
    _truncate(rec, reader.offsets[last] + 10)  # the chunk header survives, the data is cut
    reader = IndexedRecordIO(rec, idx)
    assert reader.read(1) == records[1]  # records before the cut still read
    with pytest.raises(ValueError, match=rf"train\.rec: record {last} is cut short .*truncated: copy"):
        reader.read(last)
    _truncate(rec, reader.offsets[2] + 8)
    with pytest.raises(ValueError, match=rf"train\.rec: record {last} starts at byte .* past the end"):
        IndexedRecordIO(rec, idx)


def test_face_rec_without_evaluation_sets_fails_at_build(tmp_path):
    write_insightface_fixture(tmp_path, faces(2), [0, 1])
    cfg = SimpleNamespace(**{**vars(DataConfig()), "name": "face_rec", "root": str(tmp_path), "val_sets": []})
    with pytest.raises(ValueError, match="data.name=face_rec has no evaluation sets: set data.val_sets"):
        FACE_DATASETS["face_rec"](cfg)
