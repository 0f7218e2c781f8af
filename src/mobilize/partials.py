"""Temporary directories named after the process that writes them, swept once that process is gone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def remove_dead(parent: Path, pattern: str, marker: str) -> None:
    """Remove the directories in `parent` matching `pattern` whose name holds `{marker}{pid}-...` for a pid no
    longer running (SIGKILL leaves a process no chance to clean up after itself)."""
    for stale in parent.glob(pattern):
        try:
            pid = int(stale.name.split(marker, 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


# ---- what a dying process removes -------------------------------------------------------------------------

ACTIVE: set[str] = set()  # temporary directories this process is writing (the driver adds and discards them)
_BUS_MESSAGE = (
    b"mobilize: error: a source file was truncated or replaced while it was read (SIGBUS on its memory map); "
    b"nothing was written\n"
)
_handler = None  # the C callback must outlive its installation


def catch_bus_errors() -> None:
    """A file that shrinks under its memory map raises SIGBUS at the next read of a lost page, inside numpy's
    copy: a Python-level handler would never run (the read would fault again). A C-level handler through
    ctypes runs at once: it says so in one line, removes this process's partial directories and exits 1."""
    global _handler
    import ctypes
    import signal

    def on_bus(_signum: int) -> None:
        os.write(2, _BUS_MESSAGE)
        for path in list(ACTIVE):
            shutil.rmtree(path, ignore_errors=True)
        os._exit(1)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        kind = ctypes.CFUNCTYPE(None, ctypes.c_int)
        _handler = kind(on_bus)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = (ctypes.c_int, kind)
        libc.signal(signal.SIGBUS, _handler)
    except (OSError, AttributeError):  # no C library to call: the default action (the process dies) stays
        _handler = None
