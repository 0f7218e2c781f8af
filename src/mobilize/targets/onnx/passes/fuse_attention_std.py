"""Attention fusion for standard ONNX (`--opset std`): the decomposed grouped-query attention with a
Concat cache (the form `fuse_attention` describes) becomes one opset-23 `Attention` node: q/k/v in
[batch, heads, seq, head_dim], the graph's additive mask, past key/value in, present key/value out.
The cache still grows (opset-23 Attention concatenates; it has no in-place form), so `kv_cache` does
not apply; rotary stays a separate opset-23 `RotaryEmbedding` (run `FuseRotaryPass(std=True)` first).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mobilize.targets.onnx.passes.fuse_attention import match_attention
from mobilize.targets.onnx.passes.graph import initializer, remove_dead, replace_output, require_std_opset, std_nodes
from mobilize.targets.onnx.passes.report import ReportingPass


class FuseStdAttentionPass(ReportingPass):
    runs_after = ("FuseRotaryPass",)  # rotary fused first
    def __init__(self):
        super().__init__()
        self._name = "fuse_attention(opset 23 Attention)"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        for node in std_nodes(graph, "Softmax"):
            self._fuse(graph, node)
        if self.report.matched:
            require_std_opset(model)
            remove_dead(graph)
        return self.report.matched > 0

    def _fuse(self, graph: ir.Graph, softmax: ir.Node) -> None:
        m = match_attention(graph, softmax)
        if isinstance(m, str):
            self.report.reject(m)
            return
        # The builder's additive bias is [batch, 1, 1, seq, total] (broadcast over kv heads and groups);
        # Attention wants it broadcastable to [batch, heads, seq, total].
        bias = m["bias"]
        squeeze = None
        if bias.shape is None or len(bias.shape) != 4:
            squeeze = ir.node("Squeeze", [bias, initializer(graph, "attn_axis_2", np.asarray([2], np.int64))])
            bias = squeeze.outputs[0]
        attrs = {"q_num_heads": m["q_heads"], "kv_num_heads": m["kv_heads"], "scale": m["scale"]}
        if m["softcap"]:
            attrs["softcap"] = m["softcap"]
        inputs = [m["q_rot"], m["k_rot"], m["v_bnsh"], bias, m["past_key"], m["past_value"]]
        node = ir.node("Attention", inputs, attrs, num_outputs=3, name=f"attention_{self.report.matched}")
        graph.insert_before(m["heads_out"].producer(), [n for n in (squeeze, node) if n is not None])
        for old, new in zip((m["heads_out"], m["key"], m["value"]), node.outputs, strict=True):
            new.shape, new.type = old.shape, old.type
            replace_output(graph, old, new)
        self.report.matched += 1
