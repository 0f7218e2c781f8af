"""Blockwise quantization of embedding lookups: `Gather(E, ids)` -> `com.microsoft::GatherBlockQuantized`.

E is a constant [vocab, hidden] initializer, blocks run along hidden (the same layout MatMulNBits uses,
so a tied embedding and head quantize identically). Lookups of anything else are left alone, with the
reason counted in the report.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mobilize.quant.plan import plan_embedding
from mobilize.quant.primitives import error_stats, pack_nbits, pack_zero_points, quantize_blockwise
from mobilize.quant.recipes import WeightQuant
from mobilize.targets.onnx.caps import ONNX_CAPS
from mobilize.targets.onnx.passes.graph import (
    MS_DOMAIN,
    WRITE_LAST,
    initializer,
    remove_dead,
    source_grid,
    std_nodes,
)
from mobilize.targets.onnx.passes.quantize import TIED_HEAD, lazy_part
from mobilize.targets.onnx.passes.report import ReportingPass

DEFAULT = WeightQuant(4, 32, False)


class QuantizeGatherPass(ReportingPass):
    runs_after = ("QuantizeMatMulPass",)  # a tied table is no longer shared once the head is quantized
    def __init__(self, quant: WeightQuant = DEFAULT, *, carry_source_blocks: bool = False, share_tied: bool = False):
        """Each table stored as the weight planner says (quant/plan.py::plan_embedding): with the recipe's
        `carry_source_blocks`, an 8-bit table whose source is Q8_0 keeps the source's codes and scales. With
        `share_tied`, a table whose tied head is one plain MatMulNBits is looked up in the head's bytes instead."""
        super().__init__()
        self.quant, self.carry_source_blocks, self.share_tied = quant, carry_source_blocks, share_tied
        kind = "sym" if quant.symmetric else "asym"
        self._name = f"quantize_embedding(int{quant.bits}, block {quant.block_size}, {kind})"

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
        if self.share_tied and TIED_HEAD in table.meta:
            return self._share(graph, node, table, table.meta[TIED_HEAD])
        plan = plan_embedding(tuple(table.shape), source_grid(table), self.quant, self.carry_source_blocks, ONNX_CAPS)
        bits = plan.bits
        if plan.source == "codes":  # a Q8_0 table: its own codes and scales, exactly
            q, scale, zero_point = table.meta["block_codes"]()
            n, k = q.shape[0], q.shape[1] * q.shape[2]
            block = q.shape[2]
            stats = {"rel_rms_error": 0.0, "max_abs_error": 0.0, "carried_from_source": True}
        else:
            w = table.const_value.numpy()
            n, k = w.shape
            block = plan.block_size
            if k % block:
                raise ValueError(f"{table.name}: hidden size {k} is not a multiple of block {block}")
            q, scale, zero_point = quantize_blockwise(w, bits, block, plan.zero_point == "none")
            stats = {**error_stats(w, q, scale, zero_point), "carried_from_source": False}
        self.report.matched += 1
        self.report.details.append({"weight": table.name, "shape": [n, k], **stats, "plan": plan.describe()})
        base = f"{table.name}.gather_q{bits}b{block}"
        inputs = [
            initializer(graph, base + ".qweight", pack_nbits(q, bits).reshape(n, -1)),
            node.inputs[1],
            initializer(graph, base + ".scales", scale),
            initializer(graph, base + ".zero_points", pack_zero_points(zero_point, bits).reshape(n, -1)),
        ]
        attrs = {"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
        new = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN, name=(node.name or "") + "_q")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)

    def _share(self, graph: ir.Graph, node: ir.Node, table: ir.Value, head: dict) -> None:
        """The lookup reads the tied head's MatMulNBits bytes ([N, n_blocks, block bytes]) as they are: one copy of
        the table in the file. Its scales (and 8-bit zero points) are the head's in the [N, n_blocks, 1] shape
        GatherBlockQuantized wants (MatMulNBits accepts only [N * n_blocks] or [N, n_blocks]); the rows come out
        [.., n_blocks, block] and are reshaped to [.., K]."""
        if "split" in head:
            return self._share_split(graph, node, table, head)
        form, qweight, parts, base = head["form"], head["qweight"], head["parts"], head["base"]
        n, n_blocks, _ = qweight.shape
        k = n_blocks * form.block_size
        scales = lazy_part(graph, base + ".lookup_scales", ir.DataType.FLOAT, (n, n_blocks, 1), parts, suffix=".scales")
        inputs = [qweight, node.inputs[1], scales]
        if form.zero_point == "uint8":  # 8-bit: one byte per block, the same bytes in another shape
            inputs.append(lazy_part(graph, base + ".lookup_zero_points", ir.DataType.UINT8, (n, n_blocks, 1), parts,
                                suffix=".zero_points"))  # fmt: skip
        attrs = {"bits": form.bits, "block_size": form.block_size, "gather_axis": 0, "quantize_axis": 2}
        name = (node.name or "") + "_q"
        gather = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN, name=name)
        shape = initializer(graph, f"rows_shape_{k}", np.asarray([0, 0, k], np.int64))
        rows = ir.node("Reshape", [gather.outputs[0], shape], name=name + "_rows")
        self.report.matched += 1
        self.report.details.append({"weight": table.name, "shape": [n, k], "shared_with_head": qweight.name,
                                    "plan": form.describe()})  # fmt: skip
        ir.convenience.replace_nodes_and_values(graph, node, [node], [gather, rows], node.outputs, rows.outputs)

    def _share_split(self, graph: ir.Graph, node: ir.Node, table: ir.Value, head: dict) -> None:
        """A split head's two parts looked up each (the kept channels' blocks, the others'), joined, and put back in
        the table's channel order: one copy of the table in the file, in the head's two forms."""
        parts, base, n, k = head["parts"], head["base"], head["n"], head["k"]
        name = (node.name or "") + "_q"
        nodes, outputs = [], []
        pairs = zip(head["split"].items(), head["qweights"], strict=True)
        for (part, (channels, bits, block, zp_kind)), qweight in pairs:
            n_blocks = -(-channels // block)
            scales = lazy_part(graph, f"{base}.{part}.lookup_scales", ir.DataType.FLOAT, (n, n_blocks, 1), parts,
                               suffix=f"{part}..scales")  # fmt: skip
            inputs = [qweight, node.inputs[1], scales]
            if zp_kind == "uint8":
                zero_points = f"{base}.{part}.lookup_zero_points"
                suffix = f"{part}..lookup_zero_points"
                inputs.append(lazy_part(graph, zero_points, ir.DataType.UINT8, (n, n_blocks, 1), parts, suffix=suffix))
            attrs = {"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 2}
            gather = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS_DOMAIN, name=f"{name}_{part}")
            shape = initializer(graph, f"rows_shape_{channels}", np.asarray([0, 0, channels], np.int64))
            rows = ir.node("Reshape", [gather.outputs[0], shape], name=f"{name}_{part}_rows")
            nodes += [gather, rows]
            outputs.append(rows.outputs[0])
        joined = ir.node("Concat", outputs, {"axis": -1}, name=name + "_join")
        suffix = ".inverse_channels"
        inverse = lazy_part(graph, base + suffix, ir.DataType.INT64, (k,), parts, suffix=suffix)
        for value in [v for v in graph.initializers.values() if v.name and v.name.startswith(base + ".")]:
            value.meta[WRITE_LAST] = True  # from calibration's ranking, like the head's
        ordered = ir.node("Gather", [joined.outputs[0], inverse], {"axis": -1}, name=name + "_order")
        nodes += [joined, ordered]
        self.report.matched += 1
        self.report.details.append({"weight": table.name, "shape": [n, k], "shared_with_head": base,
                                    "plan": head["form"].describe()})  # fmt: skip
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, node.outputs, ordered.outputs)
