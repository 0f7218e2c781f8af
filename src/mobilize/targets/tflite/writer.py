"""A LiteRT (TFLite) flatbuffer, built op by op and written with the official schema module.

`TflModel` holds the operator codes, the buffers and one `TflGraph` per signature. Every buffer lives
after the flatbuffer (the schema's `offset`/`size`), so the flatbuffer itself stays a few hundred KB
whatever the model, files past 2 GB work, and the writer streams weights to disk one buffer at a time:
a buffer is `(nbytes, produce)` and `produce()` runs only when its bytes are written.

Signatures share weights by buffer: each subgraph has its own tensor records, all pointing at the one
buffer of a weight, so a second signature adds no weight bytes.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

from mobilize.errors import MobilizeError

ALIGN = 64  # buffer alignment: XNNPACK and mmap-friendly
_PLACEHOLDER = 1  # offset 1 marks "outside the flatbuffer" during the sizing pass (0 would be omitted)

TENSOR_TYPES = {
    np.dtype(np.float32): fb.TensorType.FLOAT32,
    np.dtype(np.float16): fb.TensorType.FLOAT16,
    np.dtype(np.int32): fb.TensorType.INT32,
    np.dtype(np.int64): fb.TensorType.INT64,
    np.dtype(np.int8): fb.TensorType.INT8,
    np.dtype(np.uint8): fb.TensorType.UINT8,
    np.dtype(np.bool_): fb.TensorType.BOOL,
}
INT4 = "int4"  # packed two per byte, low nibble first


@dataclasses.dataclass
class Buffer:
    nbytes: int
    produce: Callable[[], Any]  # -> bytes, a numpy array, or an iterable of them: nbytes in all


@dataclasses.dataclass
class Quant:
    """Quantization of a weight tensor: per channel (`axis`) or blockwise (`block_size`, scales tensor)."""

    scale: list[float] | None = None
    zero_point: list[int] | None = None
    axis: int = 0
    block_scales: int | None = None  # tensor index (in the graph) of the fp16 scales, blockwise only
    block_size: int = 0


class TflGraph:
    """One subgraph: tensors, operators, inputs and outputs."""

    def __init__(self, model: TflModel, name: str) -> None:
        self.model, self.name = model, name
        self.tensors: list[fb.TensorT] = []
        self.shapes: list[tuple[int, ...]] = []
        self.operators: list[fb.OperatorT] = []
        self.inputs: list[tuple[str, int]] = []
        self.outputs: list[tuple[str, int]] = []
        self._by_buffer: dict[int, int] = {}

    def tensor(self, name: str, shape, dtype, buffer: int = 0, quant: Quant | None = None) -> int:
        t = fb.TensorT()
        t.name, t.shape, t.buffer = name, list(shape), buffer
        t.type = fb.TensorType.INT4 if dtype == INT4 else TENSOR_TYPES[np.dtype(dtype)]
        if quant is not None:
            q = fb.QuantizationParametersT()
            if quant.block_size:
                details = fb.BlockwiseQuantizationT()
                details.scales, details.blockSize = quant.block_scales, quant.block_size
                q.detailsType, q.details = fb.QuantizationDetails.BlockwiseQuantization, details
            else:
                q.scale, q.zeroPoint, q.quantizedDimension = quant.scale, quant.zero_point, quant.axis
            t.quantization = q
        self.tensors.append(t)
        self.shapes.append(tuple(int(d) for d in shape))
        return len(self.tensors) - 1

    def input(self, name: str, shape, dtype) -> int:
        index = self.tensor(name, shape, dtype)
        self.inputs.append((name, index))
        return index

    def output(self, name: str, index: int) -> None:
        self.outputs.append((name, index))

    def const(self, value, dtype=np.int32) -> int:
        """A small constant, deduplicated across the whole model by content."""
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        buffer = self.model.small_buffer(arr)
        if buffer not in self._by_buffer:
            self._by_buffer[buffer] = self.tensor(f"const_{buffer}", arr.shape, arr.dtype, buffer)
        return self._by_buffer[buffer]

    def weight(self, key: str, shape, dtype, nbytes: int, produce, quant: Quant | None = None) -> int:
        """A large constant by key: one buffer per model, one tensor per graph."""
        return self.buffer_tensor(self.model.weight_buffer(key, nbytes, produce), key, shape, dtype, quant)

    def buffer_tensor(self, buffer: int, name: str, shape, dtype, quant: Quant | None = None) -> int:
        """This graph's one tensor over a model buffer."""
        if buffer not in self._by_buffer:
            self._by_buffer[buffer] = self.tensor(name, shape, dtype, buffer, quant)
        return self._by_buffer[buffer]

    def shape(self, index: int) -> tuple[int, ...]:
        return self.shapes[index]

    def dtype(self, index: int) -> np.dtype:
        return next(k for k, v in TENSOR_TYPES.items() if v == self.tensors[index].type)

    def reshape(self, x: int, shape: list[int]) -> int:
        options = fb.ReshapeOptionsT()
        options.newShape = list(shape)
        return self.op(fb.BuiltinOperator.RESHAPE, [x, self.const(shape)], shape, self.dtype(x), options)

    def op(self, code: int, inputs: list[int], out_shape, out_dtype=np.float32, options=None, name: str = "") -> int:
        out = self.tensor(name or f"t{len(self.tensors)}", out_shape, out_dtype)
        self.op_into(code, inputs, [out], options)
        return out

    def op_into(self, code: int, inputs: list[int], outputs: list[int], options=None) -> None:
        o = fb.OperatorT()
        o.opcodeIndex = self.model.opcode(code)
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType = _OPTION_TYPES[type(options)]
            o.builtinOptions = options
        self.operators.append(o)


class TflModel:
    def __init__(self, description: str = "mobilize") -> None:
        self.description = description
        self.buffers: list[Buffer | None] = [None]  # buffer 0: the schema's empty sentinel
        self.graphs: list[TflGraph] = []
        self.metadata: dict[str, bytes] = {}
        self.buffer_metadata: dict[str, int] = {}  # entries whose buffer field is the value (LiteRT-LM's lora_rank)
        self._opcodes: dict[int, int] = {}
        self._small: dict[tuple, int] = {}
        self._weights: dict[str, int] = {}

    def graph(self, name: str) -> TflGraph:
        g = TflGraph(self, name)
        self.graphs.append(g)
        return g

    def opcode(self, code: int) -> int:
        if code not in self._opcodes:
            self._opcodes[code] = len(self._opcodes)
        return self._opcodes[code]

    def small_buffer(self, arr: np.ndarray) -> int:
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._small:
            data = arr.tobytes()
            self._small[key] = self._add(Buffer(len(data), lambda d=data: d))
        return self._small[key]

    def weight_buffer(self, key: str, nbytes: int, produce) -> int:
        if key not in self._weights:
            self._weights[key] = self._add(Buffer(nbytes, produce))
        return self._weights[key]

    def _add(self, buffer: Buffer) -> int:
        self.buffers.append(buffer)
        return len(self.buffers) - 1

    # ---- serialization ----
    def _flatbuffer(self, offsets: list[int]) -> bytes:
        m = fb.ModelT()
        m.version, m.description = 3, self.description
        codes = []
        for code, _ in sorted(self._opcodes.items(), key=lambda kv: kv[1]):
            c = fb.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
            codes.append(c)
        m.operatorCodes = codes
        m.buffers = []
        for buffer, offset in zip(self.buffers, offsets, strict=True):
            b = fb.BufferT()
            if buffer is not None and buffer.nbytes:
                b.offset, b.size = offset, buffer.nbytes
            m.buffers.append(b)
        m.subgraphs, m.signatureDefs = [], []
        for i, g in enumerate(self.graphs):
            s = fb.SubGraphT()
            s.name, s.tensors, s.operators = g.name, g.tensors, g.operators
            s.inputs, s.outputs = [t for _, t in g.inputs], [t for _, t in g.outputs]
            m.subgraphs.append(s)
            sig = fb.SignatureDefT()
            sig.signatureKey, sig.subgraphIndex = g.name, i
            sig.inputs = [_tensor_map(n, t) for n, t in g.inputs]
            sig.outputs = [_tensor_map(n, t) for n, t in g.outputs]
            m.signatureDefs.append(sig)
        if self.metadata or self.buffer_metadata:
            # Metadata lives in small inline buffers appended after the weight buffers.
            m.metadata = []
            for name, data in sorted(self.metadata.items()):
                b = fb.BufferT()
                b.data = list(data)
                m.buffers.append(b)
                md = fb.MetadataT()
                md.name, md.buffer = name, len(m.buffers) - 1
                m.metadata.append(md)
            for name, value in sorted(self.buffer_metadata.items()):
                md = fb.MetadataT()
                md.name, md.buffer = name, value
                m.metadata.append(md)
        builder = flatbuffers.Builder(1 << 16)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def layout(self) -> tuple[bytes, list[int]]:
        """The flatbuffer and the absolute offset of each buffer after it."""
        sizing = self._flatbuffer([_PLACEHOLDER] * len(self.buffers))
        offsets, pos = [], _align(len(sizing))
        for buffer in self.buffers:
            if buffer is None or not buffer.nbytes:
                offsets.append(0)
                continue
            offsets.append(pos)
            pos = _align(pos + buffer.nbytes)
        head = self._flatbuffer(offsets)
        if len(head) != len(sizing):  # offsets are fixed-width fields; the size cannot change
            raise AssertionError("flatbuffer size changed between the sizing and the final pass")
        return head, offsets

    def write(self, path: Path) -> int:
        """Write the model to `path`, one buffer at a time; return the file size."""
        head, offsets = self.layout()
        with open(path, "wb") as f:
            f.write(head)
            for buffer, offset in zip(self.buffers, offsets, strict=True):
                if buffer is None or not buffer.nbytes:
                    continue
                f.write(b"\0" * (offset - f.tell()))
                data = buffer.produce()
                chunks = [data] if isinstance(data, (bytes, bytearray, np.ndarray)) else data
                written = 0
                for chunk in chunks:  # a generator streams a large buffer a slice of rows at a time
                    raw = chunk if isinstance(chunk, (bytes, bytearray)) else np.ascontiguousarray(chunk).tobytes()
                    f.write(raw)
                    written += len(raw)
                    del chunk, raw
                del data, chunks
                if written != buffer.nbytes:
                    raise AssertionError(f"buffer of {written} bytes where {buffer.nbytes} were laid out")
            f.write(b"\0" * (_align(f.tell()) - f.tell()))
            f.flush()
            os.fsync(f.fileno())
            return f.tell()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _tensor_map(name: str, index: int) -> fb.TensorMapT:
    t = fb.TensorMapT()
    t.name, t.tensorIndex = name, index
    return t


_OPTION_TYPES = {
    getattr(fb, name + "T"): getattr(fb.BuiltinOptions, name)
    for name in (
        "AddOptions",
        "MulOptions",
        "SubOptions",
        "DivOptions",
        "FullyConnectedOptions",
        "ReshapeOptions",
        "TransposeOptions",
        "ConcatenationOptions",
        "SoftmaxOptions",
        "ReducerOptions",
        "GatherOptions",
        "BatchMatMulOptions",
        "GeluOptions",
        "SliceOptions",
        "PadOptions",
        "SelectV2Options",
        "LessEqualOptions",
        "GreaterOptions",
        "LogicalAndOptions",
        "NegOptions",
        "DynamicUpdateSliceOptions",
        "CastOptions",
        "MaximumMinimumOptions",
    )
}


def signatures(path: Path) -> dict[str, dict[str, list]]:
    """The signatures of a .tflite file: {key: {"inputs": [(name, shape, type)], "outputs": [...]}},
    read from the flatbuffer alone (no interpreter)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as head:
        return _signatures(fb.Model.GetRootAs(head, 0))


def _signatures(model) -> dict[str, dict[str, list]]:
    out = {}
    for i in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(i)
        graph = model.Subgraphs(sig.SubgraphIndex())

        def describe(tm, graph=graph):
            t = graph.Tensors(tm.TensorIndex())
            return [tm.Name().decode(), [int(d) for d in t.ShapeAsNumpy()], _TYPE_NAMES.get(t.Type(), str(t.Type()))]

        out[sig.SignatureKey().decode()] = {
            "inputs": [describe(sig.Inputs(j)) for j in range(sig.InputsLength())],
            "outputs": [describe(sig.Outputs(j)) for j in range(sig.OutputsLength())],
        }
    return out


_TYPE_NAMES = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}


def weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all constant buffers, bytes one decode step reads: a GATHER table only one row)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as head:
        model = fb.Model.GetRootAs(head, 0)
        gather = next(
            (
                i
                for i in range(model.OperatorCodesLength())
                if model.OperatorCodes(i).BuiltinCode() == fb.BuiltinOperator.GATHER
            ),
            None,
        )
        rows: dict[int, int] = {}  # buffer -> rows of a table that is only gathered from
        used_otherwise: set[int] = set()
        for s in range(model.SubgraphsLength()):
            graph = model.Subgraphs(s)
            for o in range(graph.OperatorsLength()):
                op = graph.Operators(o)
                for j in range(op.InputsLength()):
                    t = op.Inputs(j)
                    if t < 0:
                        continue
                    tensor = graph.Tensors(t)
                    if op.OpcodeIndex() == gather and j == 0 and tensor.ShapeLength():
                        rows[tensor.Buffer()] = tensor.Shape(0)
                    else:
                        used_otherwise.add(tensor.Buffer())
        total = per_token = 0
        for b in range(model.BuffersLength()):
            size = model.Buffers(b).Size() or model.Buffers(b).DataLength()
            total += size
            per_token += size // rows[b] if b in rows and b not in used_otherwise else size
    return total, per_token


def tflite_io(path) -> dict:
    """The manifest's `io` of a LiteRT model: the decode signature's inputs and outputs (the names apps
    bind), and every signature, read back from the written file."""
    def values(entries):
        return [{"name": n, "dtype": _IO_DTYPES.get(t, t.upper()), "shape": s} for n, s, t in entries]

    sigs = {k: {"inputs": values(v["inputs"]), "outputs": values(v["outputs"])} for k, v in signatures(path).items()}
    return {**sigs["decode"], "signatures": sigs}


_IO_DTYPES = {"float32": "FLOAT", "int32": "INT32", "float16": "FLOAT16", "int8": "INT8", "bool": "BOOL"}


def check_buffers(path: Path) -> None:
    """Every buffer a runtime will map lies inside the file (a file cut short, or offsets edited, would make
    LiteRT read past its end)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as head:
        model = fb.Model.GetRootAs(head, 0)
        for b in range(model.BuffersLength()):
            buf = model.Buffers(b)
            offset, length = buf.Offset(), buf.Size()
            if offset > 1 and (length < 0 or offset + length > size):
                raise MobilizeError(
                    f"{path.name}: buffer {b} ({length:,} bytes at {offset:,}) lies past the end of the file "
                    f"({size:,} bytes)"
                )
