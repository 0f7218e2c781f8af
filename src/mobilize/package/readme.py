"""`README.md` of a package, for the app developer who receives it: each target writes its own."""

from __future__ import annotations

from mobilize.manifest import Manifest
from mobilize.targets.registry import target


def package_readme(manifest: Manifest, file_names: list[str]) -> str:
    """`manifest` without its file list (the README is one of the files it hashes)."""
    return target(manifest.format).readme(manifest, file_names)
