"""What a run folder's `.hydra/overrides.yaml` can make a resume do (issue 25, section 1).

The property: whatever `replayable_overrides` accepts composes without reading a config file outside the project's
`configs/` (and Hydra's own packaged configs), and the composed config carries no Hydra callbacks, no search path and
no `_target_` outside Hydra's launcher and sweeper. Overrides come from a grammar of keys (groups, nested groups,
schema keys, `hydra.*`, unknown keys, package overrides), prefixes (`+`, `++`, `~`) and values (option names, paths
with `..`, absolute paths, `file://`/`pkg://` schemes, interpolations, lists, dicts, quoted strings, sweeps), written
as the YAML node kinds an overrides.yaml can hold. The paths point at real `# @package _global_` files that would
install a callback, so a check that lets one through is caught by the file it reads.
"""
import os
import sys
from pathlib import Path

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, event, given, settings, strategies as st
from omegaconf import OmegaConf

from engine.config import CONFIG_DIR, ConfigError, register_configs, replayable_overrides

EVIL = ("# @package _global_\n"
        "hydra:\n  callbacks:\n    pwn:\n      _target_: os.system\n      _args_: [touch PWNED]\n"
        "model:\n  name: dynconv_resnet50\n")
# where Hydra may read config files from: the project's configs and Hydra's (and its plugins') packaged ones
ALLOWED_ROOTS = [CONFIG_DIR, Path(hydra.__file__).resolve().parent,
                 *(Path(p).resolve() for p in __import__("hydra_plugins").__path__)]
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")

_reads: list[str] | None = None


def _audit(event, args):
    if _reads is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.endswith((".yaml", ".yml")):
            _reads.append(path)


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def evil_dir(tmp_path_factory):
    """`evil.yaml` in a folder outside the project, and a copy in every group's parent folder for `..` paths."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "evil.yaml").write_text(EVIL)
    return folder


def config_reads_and_result(overrides: list[str]):
    """The yaml files composing `overrides` opens, and the composed config (None if composition fails)."""
    global _reads
    register_configs()
    _reads = []
    cfg = None
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
    except Exception:  # a config that does not compose is fine; what it read on the way is checked
        cfg = None
    finally:
        reads, _reads = _reads, None
    return reads, cfg


def _targets(node, path=""):
    """The paths of every `_target_` key in a plain container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        sub = f"{path}.{key}" if path else str(key)
        if key == "_target_":
            yield sub
        yield from _targets(child, sub)


def invariant_violations(overrides: list[str]) -> list[str]:
    reads, cfg = config_reads_and_result(overrides)
    bad = [f"read {r}" for r in reads
           if not any(Path(r).resolve().is_relative_to(root) for root in ALLOWED_ROOTS)]
    if cfg is not None:
        if cfg.hydra.callbacks:
            bad.append(f"hydra.callbacks {OmegaConf.to_container(cfg.hydra.callbacks)}")
        if cfg.hydra.searchpath:
            bad.append(f"hydra.searchpath {list(cfg.hydra.searchpath)}")
        bad += [f"_target_ at {t}" for t in _targets(OmegaConf.to_container(cfg, resolve=False))
                if t not in ("hydra.launcher._target_", "hydra.sweeper._target_")]
    return bad


def test_the_invariant_catches_the_reproduced_attack(evil_dir):
    """The check itself: composing `experiment=<path to evil>` (what the old replay let through) violates it."""
    rel = os.path.relpath(evil_dir / "evil", CONFIG_DIR / "experiment")
    bad = invariant_violations([f"experiment={rel}"])
    assert any(b.startswith("read ") and b.endswith("evil.yaml") for b in bad), bad
    assert any(b.startswith("hydra.callbacks") for b in bad), bad


@pytest.mark.parametrize("value", ["{rel}", "{abs}", "file://{abs}", "pkg://evil", "'{rel}'", "[{option},'{rel}']"])
@pytest.mark.parametrize("key", ["experiment", "+experiment", "model", "++model", "~model", "+cell"])
def test_group_values_that_are_paths_are_refused_with_file_and_line(tmp_path, evil_dir, key, value):
    group = key.lstrip("+~")
    value = value.format(rel=os.path.relpath(evil_dir / "evil", CONFIG_DIR / group), abs=evil_dir / "evil",
                         option=min(f.stem for f in (CONFIG_DIR / group).glob("*.yaml")))
    saved = tmp_path / "overrides.yaml"
    saved.write_text(yaml.safe_dump(["optim.lr=0.1", f"{key}={value}"]))
    with pytest.raises(ConfigError, match=rf"^{saved}:2: refusing to replay .*{group}= must name an option of "
                                          rf"configs/{group}/"):
        replayable_overrides(saved)


def test_an_overrides_file_that_is_not_a_list_is_refused(tmp_path):
    saved = tmp_path / "overrides.yaml"
    saved.write_text("experiment: ../../evil\n")
    with pytest.raises(ConfigError, match="not a YAML list of overrides"):
        replayable_overrides(saved)
    saved.write_text("- [unclosed\n")
    with pytest.raises(ConfigError, match="not a YAML list of overrides"):
        replayable_overrides(saved)


def test_real_options_and_data_paths_replay(tmp_path):
    saved = tmp_path / "overrides.yaml"
    lines = ["model=rednet26", "+experiment=ablation_involution", "debug=null", "~margin", "data=[mnist5k]",
             "data.root=../../datasets/imagenet", "model.pretrained_file=/weights/rednet26.pth", "optim.lr=0.05",
             "seed=3", "name=${now:%H}"]
    saved.write_text(yaml.safe_dump(lines))
    assert replayable_overrides(saved) == lines


# --- the grammar -------------------------------------------------------------------------------------------

SCHEMA_KEYS = ["optim.lr", "data.root", "model.pretrained_file", "trainer.epochs", "seed", "name", "model.depth",
               "op.group_channels", "sched.warmup_epochs", "task.smoothing"]
HYDRA_KEYS = ["hydra.callbacks.pwn._target_", "hydra.searchpath", "hydra.run.dir", "hydra/launcher",
              "hydra.job.env_set.X"]
UNKNOWN_KEYS = ["foo", "optim.bogus", "trainer.lr", "model/sub", "data/../hydra", "model@_global_",
                "experiment@hydra", "_target_"]


def _paths(evil: Path):
    """Ways to name the outside file: relative with `..` (from any group), absolute, with a scheme, quoted."""
    paths = [str(evil / "evil"), "/etc/passwd", "../evil", "../../../../../../../" + str(evil / "evil")]
    paths += [os.path.relpath(evil / "evil", CONFIG_DIR / g) for g in GROUPS]
    path = st.sampled_from(paths)
    return st.one_of(path, path.map(lambda p: f"file://{p}"), path.map(lambda p: f"pkg://{p}"),
                     path.map(lambda p: f"'{p}'"), path.map(lambda p: f'"{p}"'))


def _values(evil: Path):
    options = sorted({f.stem for g in GROUPS for f in (CONFIG_DIR / g).glob("*.yaml")})
    scalar = st.one_of(
        st.sampled_from(options + ["nonexistent", "null", "0.1", "3", "true", "''", "'a b'"]),
        _paths(evil),
        st.sampled_from(["${oc.env:HOME}", "${hydra:runtime.cwd}", "${model.name}", "${now:%H}",
                         "${oc.create:{_target_:os.system}}"]),
    )
    collection = st.one_of(
        st.lists(scalar, min_size=1, max_size=3).map(lambda v: "[" + ",".join(v) + "]"),
        st.lists(scalar, min_size=1, max_size=2).map(lambda v: "{" + ",".join(f"k{i}:{x}" for i, x in enumerate(v)) + "}"),
        st.sampled_from(["{_target_:os.system,_args_:[touch PWNED]}", "{name:conv,module:evil_ops}", "{a:{b:1}}"]),
        st.lists(scalar, min_size=2, max_size=2).map(lambda v: ",".join(v)),  # a sweep
        scalar.map(lambda v: f"choice({v},x)"),
    )
    return st.one_of(scalar, collection)


PREFIX = st.sampled_from(["", "+", "++", "~"])


def _override(evil: Path):
    key = st.one_of(st.sampled_from(GROUPS), st.sampled_from(SCHEMA_KEYS), st.sampled_from(HYDRA_KEYS),
                    st.sampled_from(UNKNOWN_KEYS))
    value = st.one_of(st.none(), _values(evil))
    return st.builds(lambda p, k, v: p + k if v is None else f"{p}{k}={v}", PREFIX, key, value)


def _attack(evil: Path):
    """A config group whose value names the outside file (alone or in a list)."""
    value = st.one_of(_paths(evil), _paths(evil).map(lambda p: f"[{p}]"))
    return st.builds(lambda p, g, v: f"{p}{g}={v}", PREFIX, st.sampled_from(GROUPS), value)


def _benign():
    """Overrides a real run folder holds (so that accepted files are common and get composed)."""
    option = st.sampled_from(GROUPS).flatmap(
        lambda g: st.sampled_from(sorted(f.stem for f in (CONFIG_DIR / g).glob("*.yaml"))).map(lambda o: f"{g}={o}"))
    data = st.sampled_from(["optim.lr=0.05", "data.root=../../data/imagenet", "model.pretrained_file=/w/r.pth",
                            "seed=3", "name=${now:%H}", "trainer.epochs=2", "+model.depth=26", "~debug"])
    return st.one_of(option, data)


def _yaml_file(evil: Path):
    """An overrides.yaml: a list of scalars in any YAML quoting style, or another node kind."""
    items = st.lists(st.one_of(_override(evil), _attack(evil), *[_benign()] * 4), min_size=1, max_size=3)
    style = st.sampled_from([None, "'", '"'])
    as_list = st.builds(lambda xs, s: yaml.dump(xs, default_style=s, width=10_000), items, style)
    nested = items.map(lambda xs: yaml.safe_dump([xs[:1], *xs[1:]]))
    mapping = items.map(lambda xs: yaml.safe_dump({x.split("=")[0]: x.partition("=")[2] for x in xs}))
    tagged = items.map(lambda xs: "".join(f"- !!python/object/apply:os.system [{x!r}]\n" for x in xs))
    scalar = items.map(lambda xs: yaml.safe_dump(xs[0]))
    tagged_scalars = items.map(lambda xs: "".join(f"- !!str {x!r}\n" for x in xs))
    return st.one_of(as_list, as_list, as_list, st.one_of(nested, mapping, tagged, tagged_scalars, scalar))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_accepted_overrides_never_reach_outside_configs(tmp_path, evil_dir, data):
    text = data.draw(_yaml_file(evil_dir))
    saved = tmp_path / "overrides.yaml"
    saved.write_text(text)
    try:
        replay = replayable_overrides(saved)
    except ConfigError:
        event("refused")
        return
    event(f"accepted, {len(replay)} override(s)")
    assert invariant_violations(replay) == [], (text, replay)
