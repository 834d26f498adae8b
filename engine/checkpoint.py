"""Atomic checkpoints, RNG state capture, and finding the run to resume; safe loading is the library's
(`dynconv.checkpoint.load`).

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then renamed
over the old one (and the folder fsync'ed), so a kill at any moment leaves either the previous or
the new file, never a torn one. Loading always uses `weights_only=True`: a checkpoint cannot run code.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dynconv.checkpoint import CheckpointError, load

from . import faults
from .config import ConfigError

CKPT_DIR = "checkpoints"
# what fixes the network a checkpoint's weights belong to; a resume may change anything else
NETWORK_GROUPS = ("model", "op", "policy")
NETWORK_KEYS = ("task.name", "task.margin.name", "data.name", "data.num_classes")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        faults.kill_point("save")
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        while chunk := fi.read(1 << 22):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _network(cfg: DictConfig) -> dict:
    """Flat `key: value` view of what decides the network's architecture."""
    flat = {}
    for group in NETWORK_GROUPS:
        node = OmegaConf.to_container(cfg[group], resolve=False) if group in cfg else {}
        flat.update({f"{group}.{k}": v for k, v in (node or {}).items()})
    flat.update({k: OmegaConf.select(cfg, k) for k in NETWORK_KEYS})
    return flat


def _describe(net: dict) -> str:
    return f"{net.get('model.name')}/{net.get('op.name') or 'default'}"


def network_diffs(saved: DictConfig, cfg: DictConfig) -> tuple[str, str, list[str]]:
    """The networks two configs build, described (`model/op`), and each key where they differ (`key: old -> new`)."""
    old, new = _network(saved), _network(cfg)
    diffs = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return _describe(old), _describe(new), diffs


def check_resumable(ckpt: Path, cfg: DictConfig) -> None:
    """Refuse to resume `ckpt` under a config that builds another network, in one line and before any file of
    the run folder is touched (train.py calls this before Hydra starts the job). A damaged `ckpt` is refused
    naming the other checkpoints of its folder to resume from instead."""
    try:
        saved_config = load(ckpt, mmap=True)["config"]
    except CheckpointError as e:
        others = sorted(p for p in Path(ckpt).parent.glob("*.pt") if p.name != Path(ckpt).name)
        offer = f"resume from {' or '.join(f'trainer.resume={p}' for p in others)}" if others else \
            f"{Path(ckpt).parent} holds no other checkpoint, so start a new run"
        raise CheckpointError(f"trainer.resume: {e}; nothing in the folder was changed: {offer}") from None
    old, new, diffs = network_diffs(OmegaConf.create(saved_config), cfg)
    if diffs:
        raise ConfigError(f"trainer.resume={ckpt}: checkpoint is {old}, the command asks for "
                          f"{new} ({'; '.join(diffs)}); resume with the checkpoint's model, op, policy, "
                          "task and data, or start a new run")


def rng_state() -> dict:
    """Every RNG the run draws from: python, numpy, torch (CPU) and CUDA."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_finished(run: Path) -> bool:
    """Whether the run trained all its epochs (its summary.json, rewritten after every epoch, says so)."""
    try:
        summary = json.loads((run / "summary.json").read_text())
        return summary["epochs_done"] >= summary["total_epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_latest_run(root: str | Path = "outputs") -> tuple[Path, str]:
    """The unfinished run folder under `root` whose `checkpoints/last.pt` was written most recently (a finished
    run has nothing to continue), and why it was picked, in words."""
    cands = sorted(Path(root).glob(f"**/{CKPT_DIR}/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    finished = [last.parent.parent for last in cands if run_finished(last.parent.parent)]
    run = next((last.parent.parent for last in cands if last.parent.parent not in finished), None)
    if run is None:
        raise FileNotFoundError(
            f"trainer.resume=true but no unfinished run with {CKPT_DIR}/last.pt exists under "
            f"{Path(root).resolve()} ({len(finished)} finished); start a new run, or pass "
            "trainer.resume=<run folder or .pt file>")
    last = run / CKPT_DIR / "last.pt"
    newer = sum(f.joinpath(CKPT_DIR, "last.pt").stat().st_mtime > last.stat().st_mtime for f in finished)
    why = (f"continuing {run}: the unfinished run whose last.pt is the newest "
           f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last.stat().st_mtime))})")
    return run, why + (f"; skipped {newer} newer finished run(s)" if newer else "")


def resolve_resume(value, root: str | Path = "outputs") -> tuple[Path, Path] | None:
    """`trainer.resume` → (run folder, checkpoint file), or None for a fresh run."""
    if value in (None, False, "", "false", "False", "null"):
        return None
    if value in (True, "true", "True"):
        run, why = find_latest_run(root)
        print(f"trainer.resume=true: {why}", file=sys.stderr, flush=True)
        return run, run / CKPT_DIR / "last.pt"
    p = Path(str(value))
    if p.is_dir():
        ckpt = p / CKPT_DIR / "last.pt"
        if not ckpt.exists():
            raise FileNotFoundError(f"trainer.resume={value}: no {CKPT_DIR}/last.pt in that folder")
        return p, ckpt
    if p.is_file():
        run = p.parent.parent if p.parent.name == CKPT_DIR else p.parent
        return run, p
    raise FileNotFoundError(f"trainer.resume={value}: neither a run folder nor a checkpoint file")
