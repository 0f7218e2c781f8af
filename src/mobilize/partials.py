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
