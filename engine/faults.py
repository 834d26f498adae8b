"""Test hook for crash safety: SIGKILL this process at a named point of the loop. Off unless the tests set it.

`DYNCONV_FAULT_KILL=<point>` or `<point>:<n>` kills the process the first time `point` is reached (with `n`:
when its count equals n). Points:
- `save`: inside a checkpoint write, after the bytes and before the fsync and rename (the old file must survive);
- `update`: after optimizer update n (a resume from the last checkpoint must match an uninterrupted run).

`DYNCONV_FAULT_SIGNAL=<name>` (e.g. `TERM`, `USR2`) sends that signal instead of SIGKILL: a preemption at a known step.
"""
from __future__ import annotations

import os
import signal

ENV = "DYNCONV_FAULT_KILL"
SIGNAL_ENV = "DYNCONV_FAULT_SIGNAL"


def kill_point(point: str, count: int | None = None) -> None:
    """Signal the process (SIGKILL unless `DYNCONV_FAULT_SIGNAL` names another) if `DYNCONV_FAULT_KILL` names this
    point (and, when it gives n, `count == n`)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and (not at or count == int(at)):
        os.kill(os.getpid(), signal.Signals["SIG" + os.environ.get(SIGNAL_ENV, "KILL")])
