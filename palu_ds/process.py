"""How a launch script's process ends: run ``main``, flush, and leave through ``os._exit``.

Why: a 2-rank CPU job (gloo + DeepSpeed's shm all-reduce) that has finished all its work, passed its final barrier
and closed its files can still abort in interpreter teardown, when C++ static destructors run in no fixed order:
``terminate called without an active exception`` and exit status -6 (seen here about once in 100 launches, and by
open-unlearning in 3 of 14 runs). A finished job that reports failure breaks requeue logic and CI, so the launch
scripts never enter that teardown: every file is closed and every collective done before ``main`` returns, and
then the process leaves with the status ``main`` gave. Tracebacks and ``SystemExit`` keep their usual meaning.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable


def exit_status(code) -> int:
    """The process exit status Python would give ``sys.exit(code)`` (None -> 0, an int as is, a message -> 1)."""
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def refusing(fn: Callable[[], object], refused: type | tuple, status: int = 2):
    """``fn()`` (None: 0); an exception of ``refused`` (input the command refuses, its message naming what is wrong
    and what to do) is printed as ``error: <message>`` on stderr instead of a traceback, and gives ``status``."""
    try:
        return fn() or 0
    except refused as e:
        print(f"error: {e}", file=sys.stderr)
        return status


def run_main(main: Callable[..., object], *args, **kwargs) -> None:
    """Call ``main(*args, **kwargs)`` and end the process with its status, skipping interpreter teardown."""
    try:
        status = exit_status(main(*args, **kwargs))
    except SystemExit as e:  # argparse errors, Preempted (143), explicit sys.exit in main
        status = exit_status(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 130
    except BaseException:  # noqa: BLE001 - any crash: print it as Python would, exit 1
        traceback.print_exc()
        status = 1
    logging.shutdown()
    hard_exit(status)


def hard_exit(status: int) -> None:
    """Flush stdout and stderr and end the process now with ``status`` (no interpreter teardown, no atexit)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
