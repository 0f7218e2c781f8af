"""Cleanup: fold operations on small constants, merge identical small constants, drop what nothing
uses, and sort the graph. Large weights are never read here (they stay lazy until written)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from mobilize.targets.onnx.passes.graph import SMALL, remove_dead, replace_output, small_const
from mobilize.targets.onnx.passes.report import ReportingPass

_NO_FOLD = {"Shape", "Size", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


class CleanupPass(ReportingPass):
    def __init__(self):
        super().__init__()
        self._name = "cleanup"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        folded = sum(self._fold(graph, node) for node in list(graph))
        merged = _dedupe(graph)
        removed = remove_dead(graph)
        TopologicalSortPass()(model)
        self.report.matched = folded + merged + removed
        self.report.details.append({"folded": folded, "constants_merged": merged, "nodes_removed": removed})
        return bool(folded or merged or removed)

    def _fold(self, graph: ir.Graph, node: ir.Node) -> int:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or not node.inputs:
            return 0
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return 0
        values = [small_const(v) if v is not None else None for v in node.inputs]
        if any(v is None and i is not None for v, i in zip(values, node.inputs, strict=True)):
            return 0
        try:
            results = _evaluate(node, values, graph.opset_imports.get("", 21))
        except Exception as e:  # an op the reference evaluator cannot run: leave it
            self.report.reject(f"{node.op_type} not folded ({type(e).__name__})")
            return 0
        if any(r.size > SMALL for r in results):
            return 0
        for i, (out, arr) in enumerate(zip(node.outputs, results, strict=True)):
            new = ir.Value(name=f"{node.name or node.op_type}_folded_{i}", const_value=ir.Tensor(np.asarray(arr)))
            new.shape, new.type = ir.Shape(np.shape(arr)), ir.TensorType(new.const_value.dtype)
            graph.register_initializer(new)
            replace_output(graph, out, new)
        return 1


def _evaluate(node: ir.Node, values: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    del proto.input[:], proto.output[:]
    proto.input.extend(names)
    proto.output.extend(outs)
    graph = onnx.helper.make_graph([proto], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None) for o in outs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: v for n, v in zip(names, values, strict=True) if n}
    graph.input.extend(onnx.helper.make_tensor_value_info(n, 0, None) for n in feeds)
    return list(ReferenceEvaluator(model).run(None, feeds))


def _dedupe(graph: ir.Graph) -> int:
    """Merge small initializers with equal dtype, shape and bytes into the first of them."""
    seen: dict[tuple, ir.Value] = {}
    merged = 0
    for name, value in list(graph.initializers.items()):
        if value in graph.inputs or value in graph.outputs:
            continue
        arr = small_const(value)
        if arr is None:
            continue
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in seen:
            value.replace_all_uses_with(seen[key])
            del graph.initializers[name]
            merged += 1
        else:
            seen[key] = value
    return merged
