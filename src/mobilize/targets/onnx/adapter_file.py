"""The ONNX target's LoRA adapter file: ONNX Runtime's adapter format (`.onnx_adapter`, written and read with
`onnxruntime.AdapterFormat`), which `onnxruntime.LoraAdapter` and `onnxruntime_genai.Adapters` load. Its tensors are
named as the graph's slot inputs (`<module>.lora_A` [in, r], `<module>.lora_B` [r, out]); its model version is the
digest of the package it was made for (package/adapter.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.frontend.lora import slot_inputs
from mobilize.safe_io import quoted

SUFFIX = ".onnx_adapter"
EMPTY = None  # ONNX Runtime (and GenAI) run the slots as zeros when no adapter is active
FORMAT_VERSION = 1


def slot_name(module: str, half: str) -> str:
    return slot_inputs(module)[0 if half == "A" else 1]


def write_adapter(path: Path, tensors: dict[str, np.ndarray], base: int, rank: int) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(FORMAT_VERSION)
    fmt.set_model_version(base)
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}  # (OrtValues borrow them)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(os.fspath(path))


def read_adapter(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        # copies: the arrays are views of memory the reader owns, freed with it
        return fmt.get_model_version(), {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
    except Exception:  # ORT's own types: not the format, truncated, a tensor type numpy has not
        raise MobilizeError(f"--adapter {quoted(path)} is not an ONNX Runtime adapter file ({SUFFIX})") from None
