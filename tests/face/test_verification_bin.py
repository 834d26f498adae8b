"""Verification .bin files: insightface's pickle of (encoded images, same flags), loaded with a data-only unpickler."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from data.face import UnsafePickleError, bin_pairset, load_verification_bin, read_verification_bin


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for _ in range(6)]
    return images, [True, False, True]


def py2_pickle(blobs, flags):
    """What Python 2's `pickle.dump((bins, issame_list), f, protocol=2)` writes (insightface lfw2pack.py):
    the images are Python 2 `str` (BINSTRING), the flags NEWTRUE/NEWFALSE."""
    out = [b"\x80\x02", b"]", b"("]
    for blob in blobs:
        out.append(b"T" + struct.pack("<i", len(blob)) + blob)
    out += [b"e", b"]", b"("] + [b"\x88" if f else b"\x89" for f in flags] + [b"e", b"\x86", b"."]
    return b"".join(out)


def test_reads_python2_files(tmp_path, pairs):
    images, flags = pairs
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_pickle([png(i) for i in images], flags))
    decoded, issame = read_verification_bin(path)
    assert issame == flags and all(type(s) is bool for s in issame)
    assert len(decoded) == 6 and all(d.dtype == np.uint8 and d.shape == (8, 6, 3) for d in decoded)
    assert all(np.array_equal(d, i) for d, i in zip(decoded, images))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_reads_python3_files(tmp_path, pairs, protocol):
    images, flags = pairs
    path = tmp_path / "cfp_fp.bin"
    with open(path, "wb") as f:  # protocol 2 rebuilds bytes through _codecs.encode
        pickle.dump(([png(i) for i in images], flags), f, protocol=protocol)
    decoded, issame = read_verification_bin(path)
    assert issame == flags and all(np.array_equal(d, i) for d, i in zip(decoded, images))
    ps = bin_pairset(path, img_size=8)
    assert ps.name == "cfp_fp" and ps.pairs.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert ps.issame.tolist() == flags and ps.images[5][0].shape == (3, 8, 8)


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_refused(tmp_path, pairs):
    images, flags = pairs
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(([png(images[0]), _RunsCode(target)], flags[:1]), f, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle.*system.*only bytes, lists, tuples, bools"):
        read_verification_bin(path)
    assert not target.exists()


def test_codecs_encode_only_as_latin1(tmp_path):
    # the one global admitted is `_codecs.encode(str, "latin1")`; the same call with another codec is refused
    evil = pickle.dumps(([b"\x00", b"\x01"], [True]), protocol=2).replace(
        b"X\x06\x00\x00\x00latin1", b"X\x06\x00\x00\x00rot_13")
    assert b"rot_13" in evil and b"latin1" not in evil
    path = tmp_path / "codec.bin"
    path.write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="rot_13"):
        load_verification_bin(path)


def test_malformed_contents_are_named(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps([[b"a", b"b"], [1.5]]))
    with pytest.raises(ValueError, match="flags must be bools"):
        load_verification_bin(path)
    path.write_bytes(pickle.dumps([[b"a", 3], [True]]))
    with pytest.raises(ValueError, match="encoded file"):
        load_verification_bin(path)
    path.write_bytes(pickle.dumps([[b"a"], [True]]))
    with pytest.raises(ValueError, match="1 images for 1 pairs"):
        load_verification_bin(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="expected a pickled"):
        load_verification_bin(path)
