"""`README.md` of a package, for the app developer who receives it: each target writes its own."""

from __future__ import annotations

from typing import Any

from mobilize.targets.registry import TARGETS


def package_readme(manifest: dict[str, Any], file_names: list[str]) -> str:
    """`manifest` without its file list (the README is one of the files it hashes)."""
    return TARGETS[manifest["format"]].readme(manifest, file_names)
