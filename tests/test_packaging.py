"""`pip install .` (pyproject.toml) and `make setup`'s kernel build (`python -m dynconv.functional.native`)."""
import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dynconv.functional import native

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = {"models", "data", "engine", "scripts", "tests", "configs"}  # must stay out of site-packages
# a `ninja` first on PATH that fails: the kernel build must use the `ninja` package's binary instead
FAKE_NINJA = "#!/bin/sh\necho 'the ninja on PATH was run' >&2\nexit 1\n"
CHECKS = """
import importlib.util
import torch
import dynconv
from dynconv.functional import native

site = Path(sys.argv[1])
assert Path(dynconv.__file__).parent == site / "dynconv", dynconv.__file__
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("engine") is None
x = torch.randn(2, 16, 9, 9, requires_grad=True)
dynconv.create_op("involution", 16, 16, 3)(x).sum().backward()
used = [e for e in vars(native).values() if isinstance(e, native.Extension) and e.tried]
assert used and all(e.info["built"] for e in used), [e.info for e in used]
assert all(site in Path(src).parents for e in used for src in e.sources), [e.sources for e in used]
print("native:", ", ".join(e.name for e in used))

from dynconv.checkpoint import CheckpointError
from dynconv.models._factory import timm_model

paper = dynconv.models.create("rednet26", num_classes=10)
assert type(paper).__module__.startswith("dynconv.models."), type(paper).__module__
weights = Path("r18.pth")
torch.save({k: torch.full_like(v, 0.5) for k, v in timm.create_model("resnet18").state_dict().items()}, weights)
r18 = timm_model("resnet18", pretrained=True, pretrained_file=str(weights))
assert torch.equal(r18.conv1.weight, torch.full_like(r18.conv1.weight, 0.5))
weights.write_bytes(b"not weights")
try:
    timm_model("resnet18", pretrained=True, pretrained_file=str(weights))
    raise AssertionError("a damaged pretrained_file loaded")
except CheckpointError as e:
    assert str(e).startswith("r18.pth is damaged or not a checkpoint") and "\\n" not in str(e), e
print("pretrained_file: loaded")
"""


def readme_block() -> str:
    """The code of the README's "Use the operators in your own model" section."""
    section = (ROOT / "README.md").read_text().split("### Use the operators in your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def expected_files() -> set[str]:
    """What the wheel must hold: the `dynconv` sources and kernels, and `models/` as `dynconv/models/`."""
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dynconv").rglob("*.py")}
    files |= {p.relative_to(ROOT).as_posix() for ext in ("cpp", "h") for p in (ROOT / "dynconv/csrc").glob(f"*.{ext}")}
    files |= {"dynconv/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "models").rglob("*.py")}
    return {f for f in files if "__pycache__" not in f}


def _imported(path: Path):
    """(line, top-level name) of every module `path` imports: import statements at any depth (a lazy import in a
    function counts) and `importlib.import_module` / `__import__` calls on a literal name."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            yield node.lineno, str(node.args[0].value).split(".")[0]


def test_the_library_imports_nothing_of_the_framework():
    """What `pip install` ships (dynconv/, and models/ as dynconv.models) imports no other folder or module of the
    clone: installed, they are not there. Relative imports stay inside the package; absolute ones name `dynconv`."""
    clone = {p.stem for p in ROOT.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py")}
    clone -= {"dynconv"}
    assert {"engine", "data", "scripts", "models", "train"} <= clone
    found = [f"{path.relative_to(ROOT)}:{line} imports {name}" for pkg in ("dynconv", "models")
             for path in sorted((ROOT / pkg).rglob("*.py")) for line, name in _imported(path) if name in clone]
    assert not found, found


@pytest.mark.slow
def test_pip_install_gives_the_library_alone(tmp_path):
    """`pip install --target` from a copy of the clone, then the README section's code, involution on the native
    kernel compiled from the installed sources, and a timm model with `pretrained_file=` (read by the library's safe
    loader: a damaged file is one line), from another folder with only the install importable."""
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "outputs", "multirun", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--no-deps", "--no-build-isolation", "--target", str(site), str(src)]
    res = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr

    assert {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")} == {"dynconv"}
    installed = {p.relative_to(site).as_posix() for p in (site / "dynconv").rglob("*")
                 if p.suffix in (".py", ".cpp", ".h") and "__pycache__" not in p.parts}
    assert installed == expected_files()

    work.mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ninja").write_text(FAKE_NINJA)
    (tmp_path / "bin" / "ninja").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DYNCONV_NATIVE"}
    env.update(PYTHONPATH=str(site), DYNCONV_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(tmp_path / "bin"), env.get("PATH", "")]))
    code = "import sys\nfrom pathlib import Path\n" + readme_block() + CHECKS
    res = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "native: dynconv_" in res.stdout and "pretrained_file: loaded" in res.stdout


def test_every_subpackage_is_listed():
    """pyproject lists the packages by name (`models/` is mapped to `dynconv.models`): a new one must join the list."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dynconv").rglob("__init__.py")}
    assert setuptools["package-dir"] == {"dynconv.models": "models"}
    assert set(setuptools["packages"]) == found | {"dynconv.models"}


def test_declared_dependencies_admit_the_pinned_versions():
    """pyproject's runtime dependencies and extras hold the versions requirements.txt pins (and CI tests)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            req = Requirement(line.split("#")[0])
            pins[req.name] = str(req.specifier).removeprefix("==")
    declared = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    assert {"torch", "timm"} <= {r.name for r in declared}
    for req in declared:
        assert req.name in pins, f"{req.name} is declared in pyproject.toml but not pinned in requirements.txt"
        assert req.specifier.contains(pins[req.name]), f"{req} excludes the pinned {req.name}=={pins[req.name]}"


def test_setup_says_which_path_runs(monkeypatch, tmp_path, capsys):
    """`make setup` runs `native.main()`: one line per built kernel; a failed build prints the compiler's output
    and exits 1; DYNCONV_NATIVE=0 says the pure-PyTorch path runs."""
    for name, value in list(vars(native).items()):  # the pixel_filter kernel alone (the others build the same way)
        if isinstance(value, native.Extension) and value is not native.PIXEL_FILTER:
            monkeypatch.delattr(native, name)
    assert native.main() == 0
    assert re.search(r"compiled CPU kernel dynconv_pixel_filter (built|loaded from cache) in", capsys.readouterr().out)

    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this source is broken on purpose\n")
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "PIXEL_FILTER", native.Extension("dynconv_pixel_filter", [broken]))
    assert native.main() == 1
    err = capsys.readouterr().err
    assert "failed to build" in err and "this source is broken on purpose" in err
    assert "CPU runs use the slower pure-PyTorch path" in err and "DYNCONV_NATIVE=0" in err

    monkeypatch.setenv("DYNCONV_NATIVE", "0")
    assert native.main() == 0
    assert "CPU runs use the pure-PyTorch path" in capsys.readouterr().out
