"""Blockwise quantization of embedding lookups: `Gather(E, ids)` -> `com.microsoft::GatherBlockQuantized`.

E is a constant [vocab, hidden] initializer, blocks run along hidden (the same layout MatMulNBits uses,
so a tied embedding and head quantize identically). Lookups of anything else are left alone, with the
reason counted in the report.
"""

from __future__ import annotations

import onnx_ir as ir

from mobilize.quant.primitives import error_stats, pack_nbits, pack_zero_points, quantize_blockwise
from mobilize.targets.onnx.passes.graph import MS_DOMAIN, initializer, remove_dead, std_nodes
from mobilize.targets.onnx.passes.report import ReportingPass


class QuantizeGatherPass(ReportingPass):
    runs_after = ("QuantizeMatMulPass",)  # a tied table is no longer shared once the head is quantized
    def __init__(self, bits: int = 4, block_size: int = 32, symmetric: bool = False, carry_blocks: bool = False):
        """With `carry_blocks`, an 8-bit table whose source is Q8_0 keeps the source's codes and scales."""
        super().__init__()
        self.bits, self.block_size, self.symmetric, self.carry_blocks = bits, block_size, symmetric, carry_blocks
        kind = "sym" if symmetric else "asym"
        self._name = f"quantize_embedding(int{bits}, block {block_size}, {kind})"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        modified = False
        for node in std_nodes(graph, "Gather"):
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
        return modified

    def _rewrite(self, graph: ir.Graph, node: ir.Node, table: ir.Value) -> None:
        make_codes = table.meta.get("block_codes") if self.carry_blocks else None
        codes = make_codes() if make_codes is not None and self.bits == 8 else None
        if codes is not None:  # a Q8_0 table: its own codes and scales, exactly
            q, scale, zero_point = codes
            n, k = q.shape[0], q.shape[1] * q.shape[2]
            block = q.shape[2]
            stats = {"rel_rms_error": 0.0, "max_abs_error": 0.0, "carried_from_source": True}
        else:
            w = table.const_value.numpy()
            n, k = w.shape
            block = self.block_size
            if k % block:
                raise ValueError(f"{table.name}: hidden size {k} is not a multiple of block {block}")
            q, scale, zero_point = quantize_blockwise(w, self.bits, block, self.symmetric)
            stats = {**error_stats(w, q, scale, zero_point), "carried_from_source": False}
        self.report.matched += 1
        self.report.details.append({"weight": table.name, "shape": [n, k], **stats})
        base = f"{table.name}.gather_q{self.bits}b{block}"
        inputs = [
            initializer(graph, base + ".qweight", pack_nbits(q, self.bits).reshape(n, -1)),
            node.inputs[1],
            initializer(graph, base + ".scales", scale),
            initializer(graph, base + ".zero_points", pack_zero_points(zero_point, self.bits).reshape(n, -1)),
        ]
        attrs = {"bits": self.bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
        new = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN, name=(node.name or "") + "_q")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
