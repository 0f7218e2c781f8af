"""Write an onnx-ir model as `model.onnx` + `model.onnx.data` (weights streamed, one tensor at a time)."""

from __future__ import annotations

import math
from pathlib import Path

import onnx_ir as ir

from mobilize.errors import MobilizeError
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
    try:
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)
    except Exception as e:  # a lazy weight's own error (a NaN refused, a full disk) arrives wrapped in a SerdeError
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, (MobilizeError, OSError)):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause is e:
            raise
        raise cause from None
    return path


def weight_bytes(model_file: Path) -> tuple[int, int]:
    """(bytes of all initializers, bytes one decode step reads: a Gather table only one row)."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    gathered = set()  # tables read one row per token: the data, and a quantized table's scales and zero points
    used_otherwise = set()  # ... unless a matmul reads them too (a tied head shared with its lookup)
    for n in model.graph.node:
        if n.op_type == "Gather":
            gathered.add(n.input[0])
            used_otherwise.update(n.input[1:])
        elif n.op_type == "GatherBlockQuantized":
            gathered.update(n.input[i] for i in (0, 2, 3) if i < len(n.input))
        else:
            used_otherwise.update(n.input)
    gathered -= used_otherwise
    total = per_token = 0
    for init in model.graph.initializer:
        size = _initializer_bytes(init)
        total += size
        rows = init.dims[0] if init.dims else 1
        per_token += size // rows if init.name in gathered and rows else size
    return total, per_token


def _initializer_bytes(init) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(init.raw_data) or math.prod(init.dims) * 4
