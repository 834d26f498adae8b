"""LFW pairs.txt lists over a folder of identities, the identity ImageFolder, and the face_folder builder."""
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data.config import DataConfig
from data.face import identity_folder, lfw_pairset, read_lfw_pairs
from data.face.build import FACE_DATASETS

PEOPLE = {"Ann_A": 3, "Bob_B": 2, "Cid_C": 1}
PAIRS_TXT = "2\t2\nAnn_A\t1\t3\nBob_B\t1\t2\nAnn_A\t2\tCid_C\t1\nBob_B\t2\tAnn_A\t1\n"


@pytest.fixture
def lfw(tmp_path):
    """A tiny LFW-layout folder: root/<name>/<name>_<nnnn>.jpg, each image a flat grey level."""
    root = tmp_path / "lfw"
    for p, (name, n) in enumerate(PEOPLE.items()):
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            Image.fromarray(np.full((10, 10, 3), 40 * p + 10 * i, np.uint8)).save(root / name / f"{name}_{i:04d}.jpg")
    (root / "pairs.txt").write_text(PAIRS_TXT)
    return root


def test_read_lfw_pairs(lfw):
    pairs, issame = read_lfw_pairs(lfw / "pairs.txt", lfw)
    assert issame == [True, True, False, False]
    assert pairs[0] == (str(lfw / "Ann_A" / "Ann_A_0001.jpg"), str(lfw / "Ann_A" / "Ann_A_0003.jpg"))
    assert pairs[2] == (str(lfw / "Ann_A" / "Ann_A_0002.jpg"), str(lfw / "Cid_C" / "Cid_C_0001.jpg"))


def test_read_lfw_pairs_errors(lfw):
    (lfw / "bad.txt").write_text("Ann_A\t1\t2\t3\t4\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected `name i j`"):
        read_lfw_pairs(lfw / "bad.txt", lfw)
    (lfw / "missing.txt").write_text("Ann_A\t1\t9\n")
    with pytest.raises(FileNotFoundError, match="Ann_A_0009.jpg"):
        read_lfw_pairs(lfw / "missing.txt", lfw)


def test_lfw_pairset_loads_each_image_once(lfw):
    ps = lfw_pairset(lfw / "pairs.txt", lfw, img_size=10, mean=(0.0,), std=(1 / 255,))
    pairs, _ = read_lfw_pairs(lfw / "pairs.txt", lfw)
    assert len(ps.images) == len({p for pair in pairs for p in pair}) == 6  # Bob_B_0002, Ann_A_0001 reused
    for (a, b), (i, j) in zip(pairs, ps.pairs.tolist()):
        assert (ps.images.paths[i], ps.images.paths[j]) == (a, b)
    grey = float(ps.images[ps.pairs[2, 1]][0].mean())
    assert abs(grey - (40 * 2 + 10)) < 2  # Cid_C_0001 (JPEG, so approximately)


def test_identity_folder(lfw):
    ds = identity_folder(lfw, img_size=8, hflip=0.5)
    assert ds.classes == sorted(PEOPLE) and len(ds) == 6
    assert sorted(ds.labels) == [0, 0, 0, 1, 1, 2]
    x, y = ds[5]
    assert x.shape == (3, 8, 8) and y == 2
    assert pickle.loads(pickle.dumps(ds)).paths == ds.paths
    with pytest.raises(FileNotFoundError, match="does not exist"):
        identity_folder(lfw / "nope")


def test_build_face_folder_with_pairs_and_bin(lfw, tmp_path):
    blobs = [(lfw / "Ann_A" / f"Ann_A_000{i}.jpg").read_bytes() for i in (1, 2)]
    with open(tmp_path / "mini.bin", "wb") as f:
        pickle.dump((blobs, [True]), f)
    cfg = SimpleNamespace(**{**vars(DataConfig()), "name": "face_folder", "root": str(lfw), "channels": 3,
                             "img_size": 16, "mean": [0.5], "std": [0.5], "augment": False,
                             "val_sets": [str(lfw / "pairs.txt"), str(tmp_path / "mini.bin")], "pairs_root": None})
    train, val_sets, info = FACE_DATASETS["face_folder"](cfg)
    assert info.num_classes == 3 and info.input_size == (16, 16) and train.hflip == 0.0
    assert [v.name for v in val_sets] == ["pairs", "mini"] and [len(v.pairs) for v in val_sets] == [4, 1]
    cfg.val_sets = ["lfw_missing"]
    with pytest.raises(FileNotFoundError, match="lfw_missing.bin"):
        FACE_DATASETS["face_folder"](cfg)
