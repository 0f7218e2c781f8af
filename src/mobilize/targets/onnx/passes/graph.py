"""Small helpers the passes share: walking producers, reading small constants, editing a graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mobilize.quant.plan import SourceGrid

MS_DOMAIN = "com.microsoft"
_STD = ("", "ai.onnx")
SMALL = 4096  # constants up to this many elements are read while matching (weights never are)


STD_OPSET = 23  # RMSNormalization, RotaryEmbedding and Attention are standard from here


def std_nodes(graph: ir.Graph, op_type: str) -> list[ir.Node]:
    """The graph's `op_type` nodes of standard ONNX, listed before a pass edits anything (passes leave
    replaced nodes in place until their final `remove_dead`)."""
    return [n for n in graph if n.op_type == op_type and n.domain in _STD]


def require_std_opset(model: ir.Model) -> None:
    model.opset_imports[""] = max(model.opset_imports.get("", 0), STD_OPSET)


def producer(value: ir.Value | None, *op_types: str, domain: str = "") -> ir.Node | None:
    """The node that makes `value`, if it is one of `op_types` in `domain` (standard ONNX by default)."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.op_type not in op_types:
        return None
    if (node.domain in _STD) != (domain in _STD) or (domain not in _STD and node.domain != domain):
        return None
    return node


# meta key: an initializer the writer puts after the others (its lazy value waits on calibration still running)
WRITE_LAST = "mobilize.write_last"


def small_const(value: ir.Value | None) -> np.ndarray | None:
    """The value of a small constant (initializer or Constant node), else None. A lazy tensor (quantized
    when the model is written, perhaps from calibration still running) is not read here."""
    if value is None or isinstance(value.const_value, ir.LazyTensor):
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is None or node.op_type != "Constant" or "value" not in node.attributes:
            return None
        tensor = node.attributes["value"].as_tensor()
    if tensor.size > SMALL:
        return None
    return tensor.numpy()


def scalar(value: ir.Value | None) -> float | None:
    arr = small_const(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def ints(value: ir.Value | None) -> list[int] | None:
    arr = small_const(value)
    return [int(v) for v in arr.reshape(-1)] if arr is not None and arr.dtype.kind in "iu" else None


def last_axis_slice(node: ir.Node) -> tuple[int, int] | None:
    """(start, end) of a Slice on the last axis of a 4-d value with constant bounds and step 1; else None."""
    starts, ends = ints(node.inputs[1]), ints(node.inputs[2])
    axes = ints(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = ints(node.inputs[4]) if len(node.inputs) > 4 else None
    if starts is None or ends is None or len(starts) != 1 or axes not in ([-1], [3]) or steps not in (None, [1]):
        return None
    return starts[0], ends[0]


def attr_ints(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else default


def attr_int(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def is_graph_input(graph: ir.Graph, value: ir.Value | None) -> bool:
    return value is not None and value in graph.inputs


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer (or the existing one of that name: one copy shared by every user)."""
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value


def replace_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every use of `old` at `new`; if `old` is a graph output, `new` takes its place and name."""
    for i, out in enumerate(graph.outputs):
        if out is old:
            name, shape, type_ = old.name, old.shape, old.type
            old.name = None
            graph.outputs[i] = new
            new.name, new.shape, new.type = name, new.shape or shape, new.type or type_
    old.replace_all_uses_with(new)


def remove_dead(graph: ir.Graph) -> int:
    """Drop nodes and initializers nothing uses any more; return how many nodes went."""
    outputs = set(graph.outputs)
    removed = 0
    for node in reversed(list(graph)):
        if all(not v.uses() and v not in outputs for v in node.outputs):
            graph.remove(node, safe=True)
            removed += 1
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in outputs and value not in graph.inputs:
            del graph.initializers[name]
    return removed


def source_grid(weight: ir.Value) -> SourceGrid | None:
    """The source block format an initializer carries in its metadata (the emitter's, or packing's), if any."""
    form = weight.meta.get("block_form")
    if form is None:
        return None
    exact, codes = weight.meta.get("block_grid") is not None, weight.meta.get("block_codes") is not None
    return SourceGrid(weight.meta.get("block_kinds", ()), form[0], form[1], exact, codes)
