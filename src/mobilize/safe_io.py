"""Reading files a user or a stranger handed us: regular files only, symlinks only within their directory,
sizes bounded before anything is parsed, names quoted and cut short in messages."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError

MAX_JSON_BYTES = 16 << 20  # config, tokenizer_config, generation_config, manifest, genai_config
MAX_TOKENIZER_JSON_BYTES = 128 << 20  # Gemma 3's is 33 MB
MAX_NAME_CHARS = 200


def quoted(name: object, limit: int = MAX_NAME_CHARS) -> str:
    """A name for an error line: repr-quoted (a newline cannot start a forged second line) and cut short."""
    text = repr(str(name))
    return text if len(text) <= limit else f"{text[: limit - 20]}...' ({len(text)} characters)"


def _allowed_roots(root: Path) -> list[Path]:
    """Where a symlink in `root` may point: inside it, or, for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<rev>/`), inside that repository's cache (`../../blobs`)."""
    root = root.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent)
    return roots


def regular_file(path: Path, root: Path | None = None, follow: bool = False) -> os.stat_result:
    """The file's stat if it is a regular file (FIFOs, devices and directories are refused before any open
    blocks on them). A symlink is followed only to a regular file inside `root` (the model's directory), or
    anywhere with `follow` (a path the user named themselves)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) and not follow:
            target = Path(os.path.realpath(path))
            if root is None or not any(target.is_relative_to(r) for r in _allowed_roots(root)):
                raise MobilizeError(
                    f"{quoted(path)} is a symlink to {quoted(target)}, outside the model's directory; "
                    "copy the file in if it belongs to the model"
                )
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(path)
    except FileNotFoundError:
        raise MobilizeError(f"{quoted(path)} does not exist") from None
    except OSError as e:
        raise MobilizeError(f"{quoted(path)}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MobilizeError(f"{quoted(path)} is not a regular file")
    return st


def read_bytes(path: Path, limit: int, root: Path | None = None, follow: bool = False) -> bytes:
    st = regular_file(path, root, follow)
    if st.st_size > limit:
        raise MobilizeError(f"{quoted(path)}: {st.st_size:,} bytes is more than the {limit:,} such a file may have")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # swapped for a FIFO since the lstat: does not block
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MobilizeError(f"{quoted(path)} is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise MobilizeError(f"{quoted(path)}: cannot read: {e.strerror}") from None
    if len(data) > limit:
        raise MobilizeError(f"{quoted(path)} grew past {limit:,} bytes while it was read")
    return data


def read_json(
    path: Path, limit: int = MAX_JSON_BYTES, root: Path | None = None, kind: type = dict, follow: bool = False
) -> Any:
    """A JSON document of bounded size and nesting, of the given top-level type; an object's key given twice
    is refused (json would keep the last silently)."""
    raw = read_bytes(path, limit, root, follow)
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MobilizeError(f"{quoted(path)} is not valid JSON ({type(e).__name__})") from None
    except DuplicateKey as e:
        raise MobilizeError(f"{quoted(path)}: key {quoted(e.args[0], 80)} appears twice in one object") from None
    if not isinstance(value, kind):
        raise MobilizeError(f"{quoted(path)}: not a JSON {'object' if kind is dict else kind.__name__}")
    return value


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: an object whose key appears twice is an error, not its last value."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def fingerprint(files: list[str]) -> list[tuple]:
    """What changes when a file is rewritten, truncated or replaced: checked again before a package is installed."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((f, None, None, None))
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
