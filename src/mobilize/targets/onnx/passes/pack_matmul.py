"""Packed projections: MatMuls that read the same input with constant weights [K, N_i] (q/k/v, gate/up)
become one MatMul over the concatenated weight [K, sum N_i] and a Split, so each input row is read once.

Weights stay lazy: the packed tensor is concatenated only when written or quantized. A source block
grid (GGUF) packs along with them when every part has the same bits and block size; with `carry_blocks`,
parts whose grids differ are left unpacked rather than re-rounded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from mobilize.targets.onnx.passes.graph import initializer, remove_dead, replace_output, std_nodes
from mobilize.targets.onnx.passes.report import ReportingPass


class PackMatMulPass(ReportingPass):
    runs_after = ("FuseGroupQueryAttentionPass", "FuseStdAttentionPass")  # packed q/k/v feed the fused attention
    def __init__(self, carry_blocks: bool = False, plan: Callable[[ir.Value, int, int], Any] | None = None):
        super().__init__()
        self.carry_blocks = carry_blocks
        self.plan = plan  # (weight, n, k) -> its WeightForm (the quantize pass's): when packing re-rounds nothing
        self._name = "pack_matmul"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        groups: dict[int, list[ir.Node]] = {}
        for node in std_nodes(graph, "MatMul"):
            if _const_weight(node) is not None:
                groups.setdefault(id(node.inputs[0]), []).append(node)
        for nodes in groups.values():
            if len(nodes) > 1:
                self._pack(graph, nodes)
        if self.report.matched:
            remove_dead(graph)
        return self.report.matched > 0

    def _pack(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        weights = [_const_weight(n) for n in nodes]
        if len({w.shape[0] for w in weights}) != 1:
            self.report.reject("weights differ in input size")
            return
        grids = [w.meta.get("block_grid") for w in weights]
        forms = {w.meta.get("block_form") for w in weights}
        if self.carry_blocks and any(grids) and (not all(grids) or len(forms) != 1):
            if not self._rounded_alike(weights):
                self.report.reject("parts have different source block formats (packing would re-round them)")
                return
            grids = [None] * len(weights)  # every part re-rounded to one form anyway (a merged LoRA's q and v beside
            # the base's k): packed as the base packs them, its grids dropped
        names = [w.name or "?" for w in weights]
        name = _packed_name(names)
        sizes = [int(w.shape[1]) for w in weights]
        packed = ir.LazyTensor(
            _concat(weights), ir.DataType.FLOAT, ir.Shape([weights[0].shape[0], sum(sizes)]), name=name
        )
        value = ir.Value(name=name, const_value=packed, shape=packed.shape, type=ir.TensorType(ir.DataType.FLOAT))
        graph.register_initializer(value)
        kinds = tuple(sorted({k for w in weights for k in w.meta.get("block_kinds", ())}))
        if all(grids):
            value.meta["block_grid"] = lambda: _concat_grids([g() for g in grids])
            if len(forms) == 1:
                value.meta["block_form"], value.meta["block_kinds"] = forms.pop(), kinds
        elif not any(grids) and None not in forms:  # source types without their blocks (merged LoRA weights): the
            # planner re-rounds them at the precision of the widest part
            value.meta["block_form"], value.meta["block_kinds"] = max(forms, key=lambda f: f[0]), kinds
        matmul = ir.node("MatMul", [nodes[0].inputs[0], value], name=name + ".matmul")
        split = ir.node(
            "Split",
            [matmul.outputs[0], initializer(graph, f"split_{'_'.join(map(str, sizes))}", np.asarray(sizes, np.int64))],
            {"axis": -1},
            num_outputs=len(nodes),
            name=name + ".split",
        )
        graph.insert_before(nodes[0], [matmul, split])
        for old, new in zip(nodes, split.outputs, strict=True):
            new.type = old.outputs[0].type
            replace_output(graph, old.outputs[0], new)
        self.report.matched += 1
        self.report.details.append({"packed": names, "sizes": sizes})

    def _rounded_alike(self, weights: list[ir.Value]) -> bool:
        """Whether the planner re-rounds every part to one form (its note aside), so that packing changes no value."""
        if self.plan is None or None in {w.meta.get("block_form") for w in weights}:
            return False
        planned = [self.plan(w, int(w.shape[1]), int(w.shape[0])) for w in weights]
        if any(f is None or f.source != "rounded" or f.split is not None for f in planned):
            return False
        return len({dataclasses.replace(f, note="", declined=False) for f in planned}) == 1


def _const_weight(node: ir.Node) -> ir.Value | None:
    w = node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer() or w.dtype != ir.DataType.FLOAT:
        return None
    return w if w.shape is not None and len(w.shape) == 2 else None


def _packed_name(names: list[str]) -> str:
    stems = [n.removesuffix(".weight") for n in names]
    prefix = stems[0][: max(stems[0].rfind(".") + 1, 0)]
    if all(s.startswith(prefix) for s in stems):
        return prefix + "+".join(s[len(prefix) :] for s in stems) + ".weight"
    return "+".join(stems) + ".weight"


def _concat(weights: list[ir.Value]):
    tensors = [w.const_value for w in weights]
    return lambda: ir.Tensor(np.concatenate([t.numpy() for t in tensors], axis=1))


def _concat_grids(grids: list):
    """Source grids are per output row ([N, K / block]): packing concatenates the rows."""
    if any(g is None for g in grids) or len({(g.bits, g.block_size) for g in grids}) != 1:
        return None
    first = grids[0]
    return type(first)(
        first.bits,
        first.block_size,
        np.concatenate([g.scale for g in grids]),
        np.concatenate([g.zero_point for g in grids]),
    )
