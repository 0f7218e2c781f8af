"""Installs that cannot lose data: a path that appears while an export runs is never replaced, a source that
changes while it is read stops the export, SIGTERM and SIGBUS leave nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobilize.driver import ExportOptions, export
from mobilize.errors import MobilizeError
from mobilize.package.install import install, rename_noreplace, sweep


def _package(tmp_path: Path, tiny_hf, name: str = "pkg") -> Path:
    return export(ExportOptions(str(tiny_hf("llama")), tmp_path / name, quant="int8", max_seq_len=32))


def test_rename_noreplace_refuses_even_an_empty_directory(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()


def test_a_path_that_appears_meanwhile_is_left_alone(tmp_path, tiny_hf):
    """Two exports to one --out: the second finds the first's package (or anything) there and does not install."""
    new = _package(tmp_path, tiny_hf, "new")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the other export's, or the user's")
    with pytest.raises(MobilizeError, match="appeared while this export ran"):
        install(new, out, overwrite=False, sources=[])
    assert (out / "mine.txt").read_text() == "the other export's, or the user's" and new.is_dir()


def test_overwrite_checks_again_what_it_set_aside(tmp_path, tiny_hf):
    """--overwrite onto a package replaced by a user's directory after the first check: put back, refused."""
    new, out = _package(tmp_path, tiny_hf, "new"), tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("years")
    with pytest.raises(MobilizeError, match="not a mobilize package"):
        install(new, out, overwrite=True, sources=[])
    assert (out / "thesis.txt").read_text() == "years"
    assert not list(tmp_path.glob(".out.old-*"))


def test_overwrite_replaces_a_package(tmp_path, tiny_hf):
    old, new = _package(tmp_path, tiny_hf, "out"), _package(tmp_path, tiny_hf, "new")
    (old / "README.md").write_text("old")  # (install checks what the manifest lists, not its hashes)
    install(new, old, overwrite=True, sources=[])
    assert (old / "README.md").read_text() != "old" and not new.exists()
    assert not list(tmp_path.glob(".out.old-*"))


def test_a_package_left_aside_by_a_killed_export_is_put_back(tmp_path, tiny_hf):
    pkg = _package(tmp_path, tiny_hf, "out")
    os.rename(pkg, tmp_path / ".out.old-999999999")
    sweep(tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").is_file() and not list(tmp_path.glob(".out.old-*"))


def test_a_source_that_changes_while_it_is_read_stops_the_export(tmp_path, tiny_hf):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf("llama"), src)

    def phase(name: str) -> None:
        if name == "writing manifest":  # late: every weight has been read
            with open(src / "model.safetensors", "ab") as f:
                f.write(b"\0" * 8)

    with pytest.raises(MobilizeError, match="changed while it was read"):
        export(ExportOptions(str(src), tmp_path / "out", quant="int8", max_seq_len=32), phase=phase)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.slow  # (over 5 s: out of the fast subset)
def test_sigterm_leaves_nothing_behind(tmp_path):
    """An export of a 270M-parameter shape, terminated while it writes: one line, exit 143, no partial."""
    p = subprocess.Popen(
        [sys.executable, "-m", "mobilize.cli", "export", "gemma3-270m", "--random-weights", "--target", "host",
         "-q", "int8", "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    lines = [line for line in err.strip().splitlines() if not line.startswith("mobilize:  ")]  # (progress, if slow)
    assert p.returncode == 143 and lines == ["mobilize: terminated; nothing was left half-written"], err
    assert list(tmp_path.iterdir()) == []


def test_sigbus_from_a_shrinking_memory_map_is_one_line(tmp_path):
    """The C-level handler mobilize installs: a mapped file cut short under a read gives one line, exit 1, and
    the process's partial directories removed."""
    script = f"""
import os, numpy as np
from mobilize import partials
partials.catch_bus_errors()
d = {str(tmp_path / ".out.partial-1-x")!r}; os.mkdir(d); partials.ACTIVE.add(d)
f = {str(tmp_path / "source.bin")!r}; open(f, "wb").write(b"\\1" * (1 << 22))
mm = np.memmap(f, dtype=np.uint8, mode="r")
os.truncate(f, 100)
print(int(np.array(mm).sum()))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.splitlines() == [
        "mobilize: error: a source file was truncated or replaced while it was read (SIGBUS on its memory map); "
        "nothing was written"
    ]
    assert not (tmp_path / ".out.partial-1-x").exists()
