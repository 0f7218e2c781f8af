"""The targets: one line each. A target is a folder in `targets/` and its line here.

The folder holds two modules the rest of mobilize asks for by name, each imported on first use:

- `target.py`: `TARGET`, the export side (targets/base.py's `Target`: caps, lower, write, finish, readme, fit's
  byte counts). It imports the compiler.
- `runtime.py`: the package side, which a device runs from the pushed zip with nothing of the compiler: the model
  files the target writes (`MODEL_FILES`), the name prefix of its KV cache inputs (`CACHE_INPUTS`), the checks
  `verify` runs on them (`check(path, manifest)`), the runtimes that run its packages (`RUNTIMES`, the first the
  default) and the modules of its folder they import (`DEVICE_MODULES`: a device gets them in the runtime zip).

Nothing outside a target's folder compares a format's name: export, verify, fit, the package README, the
runners and bench go through `target()` and `runtime()`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mobilize.errors import MobilizeError

if TYPE_CHECKING:
    from mobilize.targets.base import Target

TARGETS: dict[str, str] = {
    "onnx": "mobilize.targets.onnx",
    "tflite": "mobilize.targets.tflite",
}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """One runtime that runs a target's packages."""

    description: str
    # (package dir, Manifest, threads, adapters: name -> checked tensors) -> a Runner (harness/runner.py)
    runner: Callable[..., Any] | None = None
    # engines that time themselves: (package dir, threads, prompt_len, gen_len) -> (ttft, prefill, decode) seconds
    measure: Callable[..., tuple[float, float, float]] | None = None


def _known(name: object) -> str:
    if not isinstance(name, str) or name not in TARGETS:
        raise MobilizeError(f"unknown package format {str(name)[:40]!r} (known: {', '.join(TARGETS)})")
    return name


def target(name: str) -> Target:
    """The export side of a target."""
    return importlib.import_module(f"{TARGETS[_known(name)]}.target").TARGET


def runtime(name: str) -> ModuleType:
    """The package side of a target (see the module docstring)."""
    return importlib.import_module(f"{TARGETS[_known(name)]}.runtime")


def runtimes(name: str) -> Mapping[str, Runtime]:
    return runtime(name).RUNTIMES


def all_runtimes() -> dict[str, str]:
    """Every runtime's name -> the format it runs."""
    return {rt: fmt for fmt in TARGETS for rt in runtimes(fmt)}
