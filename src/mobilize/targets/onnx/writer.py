"""Write an onnx-ir model as `model.onnx` + `model.onnx.data` (weights streamed, one tensor at a time)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from mobilize.targets.onnx.passes.graph import WRITE_LAST

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


def save_onnx(model: ir.Model, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MODEL_FILE
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if value.meta.get(WRITE_LAST):  # after every other weight: the writer waits on nothing else first
            del graph.initializers[name]
            graph.register_initializer(value)
    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)
    return path
