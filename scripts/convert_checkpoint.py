"""Convert an official checkpoint to our model's state_dict.

    python scripts/convert_checkpoint.py --arch rednet50 rednet50_official.pth rednet50.pth
    python scripts/convert_checkpoint.py --arch face_mobilenetv2_x1_0 --op tvconv official.ckpt out.pth

Builds `--arch` as timm.create_model would (with `--op` filling its slots), maps the official keys
(models/official.py), checks every key and shape, loads it, and saves our state_dict.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from dynconv.checkpoint import CheckpointError, load  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, help="registered model name, e.g. rednet50, ddf_mul_resnet50, resnet50_dcd")
    ap.add_argument("--op", default=None, help="operator filling the model's slots (default: the model's own)")
    ap.add_argument("input", type=Path, help="official checkpoint (.pth/.ckpt: a state_dict or {'state_dict': ...})")
    ap.add_argument("output", type=Path, help="where to save our state_dict")
    a = ap.parse_args(argv)
    if not a.input.is_file():
        ap.error(f"{a.input}: no such file; give the official checkpoint to convert")
    try:
        models.official.converter(a.arch)  # fail before building when the arch has no official layout
    except ValueError as e:
        ap.error(f"--arch {a.arch}: {e}")
    try:
        state = load(a.input)
    except CheckpointError as e:
        ap.error(str(e))
    size = (96, 96) if a.arch.startswith("face_") else (224, 224)
    with torch.device("meta"):  # the checkpoint provides every value
        model = models.create(a.arch, op=a.op, input_size=size)
    model.to_empty(device="cpu")
    try:
        models.load_official(model, state)
    except models.official.OfficialKeysError as e:
        ap.error(f"{a.input}: {str(e)[:400]}")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), a.output)
    print(f"{a.arch}: {len(model.state_dict())} tensors converted → {a.output}")


if __name__ == "__main__":
    main()
