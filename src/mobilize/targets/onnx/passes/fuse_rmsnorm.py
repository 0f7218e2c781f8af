"""RMSNorm fusion: `x / sqrt(mean(x*x, -1) + eps) * w` becomes one op, and a residual Add feeding it
becomes the skip input of that op.

ONNX Runtime: `SimplifiedLayerNormalization` and `com.microsoft::SkipSimplifiedLayerNormalization`
(whose fourth output is the residual sum). Standard ONNX (`std=True`): opset-23 `RMSNormalization`; it
has no skip form, so the residual Add stays.
"""

from __future__ import annotations

import onnx_ir as ir

from mobilize.targets.onnx.passes.graph import (
    MS_DOMAIN,
    attr_int,
    attr_ints,
    ints,
    producer,
    remove_dead,
    replace_output,
    require_std_opset,
    scalar,
    small_const,
    std_nodes,
)
from mobilize.targets.onnx.passes.report import ReportingPass


class FuseRMSNormPass(ReportingPass):
    def __init__(self, std: bool = False, skip: bool = True):
        super().__init__()
        self.std = std
        self.skip = skip and not std
        self._name = "fuse_rmsnorm" + ("(opset 23)" if std else "")

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        fused = 0
        for node in std_nodes(graph, "Mul"):
            fused += self._fuse_norm(graph, node)
        skipped = 0
        if self.skip:
            for node in std_nodes(graph, "SimplifiedLayerNormalization"):
                skipped += self._fuse_skip(graph, node)
        if fused or skipped:
            if self.std:
                require_std_opset(model)
            if skipped:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            remove_dead(graph)
        self.report.matched = fused
        self.report.details.append({"rmsnorm": fused, "residual_add_fused": skipped})
        return bool(fused or skipped)

    def _fuse_norm(self, graph: ir.Graph, mul: ir.Node) -> int:
        for a_idx in (0, 1):
            weight = mul.inputs[1 - a_idx]
            normed = _normalized(mul.inputs[a_idx])
            if normed is None:
                continue
            if isinstance(normed, str):
                self.report.reject(normed)
                return 0
            x, eps = normed
            if weight is None or weight.const_value is None or len(weight.shape or ()) != 1:
                self.report.reject("scale is not a constant vector")
                return 0
            op = "RMSNormalization" if self.std else "SimplifiedLayerNormalization"
            attrs = {"axis": -1, "epsilon": eps, "stash_type": 1}
            new = ir.node(op, [x, weight], attrs, name=(mul.name or "") + "_rmsnorm")
            graph.insert_before(mul, new)
            new.outputs[0].shape, new.outputs[0].type = mul.outputs[0].shape, mul.outputs[0].type
            replace_output(graph, mul.outputs[0], new.outputs[0])
            return 1
        return 0

    def _fuse_skip(self, graph: ir.Graph, norm: ir.Node) -> int:
        add = producer(norm.inputs[0], "Add")
        if add is None:
            return 0
        a, b = add.inputs
        if any(v is None or v.const_value is not None or small_const(v) is not None for v in (a, b)):
            self.report.reject("residual Add has a constant operand (a bias, not a skip)")
            return 0
        if a.shape is not None and b.shape is not None and (len(a.shape) != len(b.shape) or len(a.shape) != 3):
            self.report.reject("residual Add operands are not both [batch, seq, hidden]")
            return 0
        eps = norm.attributes["epsilon"].as_float()
        new = ir.node(
            "SkipSimplifiedLayerNormalization",
            [a, b, norm.inputs[1]],
            {"epsilon": eps},
            domain=MS_DOMAIN,
            num_outputs=4,
            name=(norm.name or "") + "_skip",
        )
        graph.insert_before(norm, new)
        for unused in new.outputs[1:3]:  # mean and 1/std: left unnamed, so ONNX Runtime does not produce them
            unused.name = ""
        y, total = new.outputs[0], new.outputs[3]
        y.shape, y.type = norm.outputs[0].shape, norm.outputs[0].type
        total.shape, total.type = add.outputs[0].shape, add.outputs[0].type
        replace_output(graph, norm.outputs[0], y)
        replace_output(graph, add.outputs[0], total)
        return 1


def _normalized(value: ir.Value | None) -> tuple[ir.Value, float] | str | None:
    """(x, eps) if `value` is x / sqrt(mean(x*x, last axis) + eps) or x * reciprocal(sqrt(...)); a reason
    string if it has that shape but something disagrees; None if it is something else entirely."""
    div = producer(value, "Div", "Mul")
    if div is None:
        return None
    x, den = div.inputs
    if div.op_type == "Div":
        sqrt = producer(den, "Sqrt")
    else:
        recip = producer(den, "Reciprocal") or producer(x, "Reciprocal")
        if recip is None:
            return None
        if producer(x, "Reciprocal") is recip:
            x = den
        sqrt = producer(recip.inputs[0], "Sqrt")
    if sqrt is None:
        return None
    add = producer(sqrt.inputs[0], "Add")
    if add is None:
        return None
    for var_idx in (0, 1):
        mean = producer(add.inputs[var_idx], "ReduceMean")
        if mean is not None:
            eps = scalar(add.inputs[1 - var_idx])
            break
    else:
        return None
    square = producer(mean.inputs[0], "Mul", "Pow")
    if square is None:
        return None
    if square.op_type == "Mul":
        squared_x = square.inputs[0] if square.inputs[0] is square.inputs[1] else None
    else:
        squared_x = square.inputs[0] if scalar(square.inputs[1]) == 2.0 else None
    if squared_x is not x:
        return "the squared tensor is not the normalized one"
    if eps is None:
        return "epsilon is not a scalar constant"
    axes = ints(mean.inputs[1]) if len(mean.inputs) > 1 else attr_ints(mean, "axes")
    rank = len(x.shape) if x.shape is not None else None
    if axes is None or len(axes) != 1 or not (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)):
        return "mean is not over the last axis only"
    if attr_int(mean, "keepdims", 1) != 1:
        return "mean drops the reduced axis"
    return x, eps
