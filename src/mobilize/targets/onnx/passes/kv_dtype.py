"""A float16 KV cache: every GroupQueryAttention runs in float16 (its past/present buffers, queries, keys, values
and rotary tables), with a Cast in front of its inputs and one back to float32 after its output.

GroupQueryAttention takes one element type T for all of those, so the cache's dtype is the attention's: ONNX
Runtime's CPU kernel accumulates in float32 inside, and the cache costs half the bytes it costs in float32 (both
the memory it holds and the bytes a decode step reads). Runs after the static cache (the buffers it retypes are
the ones that pass fixed).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mobilize.targets.onnx.passes.graph import MS_DOMAIN, initializer
from mobilize.targets.onnx.passes.report import ReportingPass

F16 = ir.DataType.FLOAT16


class KVCacheFloat16Pass(ReportingPass):
    runs_after = ("StaticKVCachePass",)
    _name = "kv_cache_dtype(float16)"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        changed = False
        for node in list(graph):
            if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN:
                continue
            past_k, past_v = node.inputs[3], node.inputs[4]
            if not (past_k in graph.inputs and past_v in graph.inputs):
                self.report.reject("past key/value are not graph inputs")
                continue
            for i in (0, 1, 2):  # query (or packed QKV), key, value
                x = node.inputs[i]
                if x is not None and x.dtype != F16:
                    cast = ir.node("Cast", [x], attributes={"to": F16}, name=f"{node.name}_in{i}_f16")
                    cast.outputs[0].dtype, cast.outputs[0].shape = F16, x.shape
                    graph.insert_before(node, cast)
                    node.replace_input_with(i, cast.outputs[0])
            for i in (7, 8):  # rotary cos / sin tables
                table = node.inputs[i] if len(node.inputs) > i else None
                if table is not None and table.const_value is not None and table.dtype != F16:
                    half = initializer(graph, f"{table.name}_f16", table.const_value.numpy().astype(np.float16))
                    node.replace_input_with(i, half)
            for value in (past_k, past_v, node.outputs[1], node.outputs[2]):
                value.dtype = F16
            out = node.outputs[0]
            uses = list(out.uses())
            back = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}_out_f32")
            back.outputs[0].dtype, back.outputs[0].shape = ir.DataType.FLOAT, out.shape
            graph.insert_after(node, back)
            for user, index in uses:
                user.replace_input_with(index, back.outputs[0])
            out.dtype = F16
            self.report.matched += 1
            changed = True
        for name in [n for n, v in graph.initializers.items() if not v.uses()]:
            del graph.initializers[name]  # the float32 rotary tables the casts replaced
        return changed
