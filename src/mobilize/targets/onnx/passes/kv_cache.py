"""Static KV cache: every attention's cache becomes a fixed buffer `[batch, kv_heads, max_seq_len,
head_dim]` that the runtime binds as both past and present, so a step writes its keys in place at the
write position and nothing is reallocated or copied while decoding.

It needs the attention fused into `com.microsoft::GroupQueryAttention` (which takes a buffer longer than
the valid length, reads `seqlens_k`, and writes at the past length); a Concat cache cannot be written
in place and is reported as rejected. Sliding-window layers keep a `max_seq_len` buffer too: the op
masks the window but has no ring buffer, so a window-sized buffer would overflow.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from mobilize.targets.onnx.passes.graph import MS_DOMAIN, attr_int, is_graph_input
from mobilize.targets.onnx.passes.report import ReportingPass

META_KEY = "mobilize.kv_cache"
WINDOW_SLACK = 16  # positions past the window in a sliding layer's buffer, as ONNX Runtime GenAI allocates


class StaticKVCachePass(ReportingPass):
    runs_after = ("FuseGroupQueryAttentionPass",)  # the cache it makes static is GroupQueryAttention's
    def __init__(self, max_seq_len: int, window_slack: int | None = WINDOW_SLACK):
        """`window_slack`: a sliding-window layer's buffer holds window + slack positions (None: every
        layer gets max_seq_len)."""
        super().__init__()
        self.max_seq_len, self.window_slack = max_seq_len, window_slack
        self._name = f"kv_cache(static, max_seq_len {max_seq_len})"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        changed = False
        fused_pasts: set[int] = set()
        for node in graph:
            if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN:
                continue
            reason = self._check(graph, node)
            if reason:
                self.report.reject(reason)
                continue
            window = attr_int(node, "local_window_size", -1)
            length = self.max_seq_len
            if window > 0 and self.window_slack is not None and window + self.window_slack < self.max_seq_len:
                length = window + self.window_slack
                changed |= attr_int(node, "sliding_window_cache", 0) != 1
                node.attributes["sliding_window_cache"] = ir.AttrInt64("sliding_window_cache", 1)
            for past, present in ((node.inputs[3], node.outputs[1]), (node.inputs[4], node.outputs[2])):
                fused_pasts.add(id(past))
                dims = list(past.shape)
                shape = ir.Shape([dims[0], dims[1], length, dims[3]])
                changed |= past.shape != shape or present.shape != shape
                past.shape, present.shape = shape, ir.Shape(shape)
            self.report.matched += 1
            self.report.details.append({"attention": node.name, "buffer": length, "window": window})
        for value in graph.inputs:
            if value.name and value.name.startswith("past_") and id(value) not in fused_pasts:
                self.report.reject(f"{value.name}: attention not fused, its Concat cache grows")
        if self.report.matched:
            windows = sorted({d["window"] for d in self.report.details if d["buffer"] < self.max_seq_len})
            meta = json.dumps({
                "layout": "static", "max_seq_len": self.max_seq_len, "share_buffer": True,
                "sliding_window": {"window": windows[0], "slack": self.window_slack, "layers": [
                    i for i, d in enumerate(self.report.details) if d["buffer"] < self.max_seq_len
                ]} if len(windows) == 1 else None,
            })  # fmt: skip
            changed |= model.metadata_props.get(META_KEY) != meta
            model.metadata_props[META_KEY] = meta
        return changed

    def _check(self, graph: ir.Graph, node: ir.Node) -> str | None:
        past_k, past_v = node.inputs[3], node.inputs[4]
        if not (is_graph_input(graph, past_k) and is_graph_input(graph, past_v)):
            return "past key/value are not graph inputs"
        if not (node.outputs[1] in graph.outputs and node.outputs[2] in graph.outputs):
            return "present key/value are not graph outputs"
        if any(v.shape is None or len(v.shape) != 4 for v in (past_k, past_v)):
            return "past key/value are not 4-D [batch, kv_heads, seq, head_dim]"
        if attr_int(node, "do_rotary", 0):
            cos = node.inputs[7].const_value if len(node.inputs) > 7 and node.inputs[7] is not None else None
            if cos is None or cos.shape[0] < self.max_seq_len:
                return f"rotary tables shorter than max_seq_len {self.max_seq_len}"
        return None


def static_kv(model_or_metadata) -> dict | None:
    """The static cache description a model was written with (None: the cache grows)."""
    props = model_or_metadata if isinstance(model_or_metadata, dict) else model_or_metadata.metadata_props
    raw = props.get(META_KEY)
    return json.loads(raw) if raw else None
