"""Write an onnx-ir model as `model.onnx` + `model.onnx.data` (weights streamed, one tensor at a time)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


def save_onnx(model: ir.Model, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MODEL_FILE
    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)
    return path
