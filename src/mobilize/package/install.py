"""Putting a finished package at its path: only ever onto nothing, or in place of another mobilize package.

`--overwrite` replaces a directory only if it is a package (a manifest that parses and lists every file there)
and holds none of the source's files; without it the final rename fails if anything appeared at the path
meanwhile (renameat2's RENAME_NOREPLACE), so two exports to one path cannot delete each other's work."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path

from mobilize.errors import MobilizeError
from mobilize.manifest import MANIFEST, SIGNATURE, Manifest
from mobilize.safe_io import quoted

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def destination(out: Path) -> Path:
    """The absolute path the package will have; its last part is not followed if it is a symlink."""
    out = Path(os.path.abspath(out))
    if out.name in ("", ".", ".."):
        raise MobilizeError(f"--out {quoted(out)} names no directory a package could have")
    return out.parent.resolve() / out.name


def why_not_replaceable(out: Path, sources: list[str]) -> str | None:
    """Why `out` must not be replaced by a package (None: it is a package that holds nothing of the source)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is a file, not a package directory"
    real = out.resolve()
    for f in sources:
        if Path(f).resolve().is_relative_to(real):
            return "it holds the source checkpoint"
    return why_not_a_package(out)


def why_not_a_package(path: Path) -> str | None:
    try:
        manifest = Manifest.read(path)
    except MobilizeError:
        return f"it is not a mobilize package (no readable {MANIFEST})"
    listed = set(manifest.files) | {MANIFEST, SIGNATURE}
    for entry in os.scandir(path):
        if entry.name not in listed:
            return f"it holds {quoted(entry.name)}, which its manifest does not list"
        if not entry.is_file(follow_symlinks=False):
            return f"its {quoted(entry.name)} is not a regular file"
    return None


def check_destination(out: Path, overwrite: bool, sources: list[str]) -> None:
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise MobilizeError(f"{quoted(out)} already exists; pass --overwrite to replace the package there")
    reason = why_not_replaceable(out, sources)
    if reason is not None:
        raise MobilizeError(f"--overwrite will not replace {quoted(out)}: {reason}; choose another --out")


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with FileExistsError if `dst` exists (even an empty directory, which rename(2) would
    replace)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), str(dst))
    os.mkdir(dst)  # fails if anything is there; the rename then replaces only this empty directory
    os.rename(src, dst)


def install(tmp: Path, out: Path, overwrite: bool, sources: list[str]) -> None:
    """Put the finished package `tmp` at `out`. A previous package is moved aside under a private name, checked
    again there (nothing can swap it any more), and deleted only once the new one is in place: a kill at any
    moment leaves the old package or the new one at `out` (a later export restores an old one left aside)."""
    old = None
    appeared = (f"{quoted(out)} appeared while this export ran (another export?); it was left as it is and this "
                "package was not installed")  # fmt: skip
    if os.path.lexists(out):
        if not overwrite:
            raise MobilizeError(appeared)
        check_destination(out, overwrite, sources)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        rename_noreplace(out, old)
        reason = why_not_replaceable(old, sources)
        if reason is not None:
            rename_noreplace(old, out)
            raise MobilizeError(f"--overwrite will not replace {quoted(out)}: {reason}; choose another --out")
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:
        kept = f"; the previous package is at {quoted(old)}" if old is not None else ""
        raise MobilizeError(appeared + kept) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep(out: Path) -> None:
    """What killed exports left beside `out`: their partial directories are removed; a previous package moved
    aside is put back if nothing took its place, else removed."""
    from mobilize.partials import remove_dead

    remove_dead(out.parent, f".{out.name}.partial-*", "partial-")
    for aside in out.parent.glob(f".{out.name}.old-*"):
        try:
            os.kill(int(aside.name.rsplit("old-", 1)[1]), 0)
            continue  # its export is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        if not os.path.lexists(out) and why_not_a_package(aside) is None:
            try:
                rename_noreplace(aside, out)
                continue
            except OSError:
                pass
        if why_not_a_package(aside) is None:
            shutil.rmtree(aside, ignore_errors=True)
