"""mobilize: open LLM checkpoints compiled into ONNX and LiteRT packages for phones, and measured.

The folders are the phases, lowest first (a phase imports only the ones before it; tests/test_layering.py):
manifest (the package's typed record), frontend (checkpoints -> config + lazy weights), model (the one decoder
and its numpy reference), quant (primitives, recipes, the weight planner, calibration), targets (onnx, tflite:
each its export side and the runtimes that run its packages), package (verify, fit, README), harness (opening
packages, perf, accuracy, devices), driver (export), bench, cli.
"""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_root() -> Path:
    """Where mobilize keeps what it derives once (the assembled bundled model, converted tokenizers, a runtime's
    packed weights, device roots): $MOBILIZE_CACHE, else ~/.cache/mobilize."""
    return Path(os.environ.get("MOBILIZE_CACHE", Path.home() / ".cache" / "mobilize"))
