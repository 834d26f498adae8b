"""Check a Python script's command line without running it: the script's imports run and its argument
parser parses the arguments (an error exits 2, as the script itself would), then it stops before any
work. `scripts/cuda_report.sh` uses it for its dry run on a machine without a GPU.

    python scripts/dev/check_command.py scripts/bench_models.py --device cuda --batch 64 --memory
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


class _Parsed(Exception):
    """Raised once the script's parser has accepted its arguments."""


def main() -> None:
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit("usage: check_command.py SCRIPT.py [ARGS...]")
    script = Path(sys.argv[1])
    if not script.is_file():
        sys.exit(f"check_command: {script} does not exist")
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *args, **kwargs):
        parse_args(self, *args, **kwargs)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        print(f"ok: {script} {' '.join(sys.argv[1:])}")
        return
    sys.exit(f"check_command: {script} finished without parsing arguments with argparse; it ran for real")


if __name__ == "__main__":
    main()
