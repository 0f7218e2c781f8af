"""Parts of mobilize that need an optional package: a missing one is one line naming what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from mobilize.errors import MobilizeError

# module -> (what needs it, what to install)
_EXTRAS = {
    "onnxruntime_genai": ("--runtime genai", "pip install 'mobilize[genai]'"),
    "matplotlib": ("bench plot", "pip install 'mobilize[plot]'"),
    "cryptography": ("signing and --key", "pip install 'cryptography>=42,<51'"),
}


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what, install = _EXTRAS.get(module.split(".")[0], ("this command", f"pip install {module}"))
        raise MobilizeError(f"{what} needs {module.split('.')[0]}, which is not installed here ({install})") from e
