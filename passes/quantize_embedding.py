"""Blockwise quantization of embedding lookups: `Gather(E, ids)` -> `com.microsoft::GatherBlockQuantized`.

E is a constant [vocab, hidden] initializer, blocks run along hidden (the same layout MatMulNBits uses,
so a tied embedding and head quantize identically). Lookups of anything else are left alone, with the
reason counted in the report.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mobilize.passes.graph import MS_DOMAIN, initializer, remove_dead
from mobilize.passes.quant_primitives import dequantize_blockwise, pack_nbits, pack_zero_points, quantize_blockwise
from mobilize.passes.report import PassReport


class QuantizeGatherPass(ir.passes.InPlacePass):
    def __init__(self, bits: int = 4, block_size: int = 32, symmetric: bool = False):
        super().__init__()
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        kind = "sym" if symmetric else "asym"
        self.report = PassReport(f"quantize_embedding(int{bits}, block {block_size}, {kind})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            table = node.inputs[0]
            if table is None or table.const_value is None or not table.is_initializer():
                self.report.reject("table is not a constant initializer")
                continue
            if len(table.shape) != 2 or table.dtype != ir.DataType.FLOAT:
                self.report.reject("table is not a 2-D float tensor")
                continue
            if node.attributes.get_int("axis", 0) != 0:
                self.report.reject("gather axis is not 0")
                continue
            self._rewrite(graph, node, table)
            modified = True
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            remove_dead(graph)
        return ir.passes.PassResult(model, modified)

    def _rewrite(self, graph: ir.Graph, node: ir.Node, table: ir.Value) -> None:
        w = table.const_value.numpy()
        n, k = w.shape
        if k % self.block_size:
            raise ValueError(f"{table.name}: hidden size {k} is not a multiple of block {self.block_size}")
        q, scale, zero_point = quantize_blockwise(w, self.bits, self.block_size, self.symmetric)
        err = dequantize_blockwise(q, scale, zero_point, k) - w
        self.report.matched += 1
        self.report.details.append({
            "weight": table.name,
            "shape": [n, k],
            "rel_rms_error": float(np.sqrt((err**2).mean() / max((w**2).mean(), 1e-30))),
            "max_abs_error": float(np.abs(err).max()),
        })  # fmt: skip
        base = f"{table.name}.gather_q{self.bits}b{self.block_size}"
        inputs = [
            initializer(graph, base + ".qweight", pack_nbits(q, self.bits).reshape(n, -1)),
            node.inputs[1],
            initializer(graph, base + ".scales", scale),
            initializer(graph, base + ".zero_points", pack_zero_points(zero_point, self.bits).reshape(n, -1)),
        ]
        attrs = {"bits": self.bits, "block_size": self.block_size, "gather_axis": 0, "quantize_axis": 1}
        new = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN, name=(node.name or "") + "_q")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
