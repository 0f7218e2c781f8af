"""Attention fusion: the plain grouped-query attention of a decoder with a Concat KV cache becomes one
`com.microsoft::GroupQueryAttention`, rotary embedding included when both q and k are rotated by the
same `com.microsoft::RotaryEmbedding` tables (run `FuseRotaryPass` first).

Matched form (heads on axis 1; what our builder emits):
    key = Concat(past_key, k, axis=2)             value = Concat(past_value, v, axis=2)
    scores = MatMul(Reshape(q, [0, kv_heads, groups, -1, d]), Transpose(Unsqueeze(key, 2), [0,1,2,4,3]))
    scores = scores * scale  [then cap * tanh(scores / cap)]
    probs = Softmax(scores + bias, -1);  out = MatMul(probs, Unsqueeze(value, 2))
    out = Reshape(Transpose(Reshape(out, [0, heads, -1, d]), [0,2,1,3]), [0, 0, heads * d])
with q, k, v = Transpose([b, s, heads, d], [0,2,1,3]) and `bias` a causal mask computed from the graph's
attention_mask (a sliding window shows as `key_pos > query_pos - window`). The op computes the causal
mask and the window itself from `seqlens_k` (valid length - 1) and the total length, both derived from
attention_mask; rotated positions are past length + i, so left padding is not supported.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mobilize.targets.onnx.passes.graph import (
    MS_DOMAIN,
    attr_int,
    attr_ints,
    initializer,
    ints,
    is_graph_input,
    last_axis_slice,
    producer,
    remove_dead,
    replace_output,
    scalar,
    std_nodes,
)
from mobilize.targets.onnx.passes.report import ReportingPass

INT32 = ir.DataType.INT32


class FuseGroupQueryAttentionPass(ReportingPass):
    runs_after = ("FuseRotaryPass",)  # rotary fused first: the attention takes its cos/sin caches (do_rotary)
    def __init__(self):
        super().__init__()
        self._name = "fuse_attention(GroupQueryAttention)"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        self._lengths: dict[int, tuple[ir.Value, ir.Value]] = {}
        for node in std_nodes(graph, "Softmax"):
            self._fuse(graph, node)
        if self.report.matched:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            remove_dead(graph)
        return self.report.matched > 0

    def _fuse(self, graph: ir.Graph, softmax: ir.Node) -> None:
        m = _match(graph, softmax)
        if isinstance(m, str):
            self.report.reject(m)
            return
        q_heads, kv_heads, head_dim = m["q_heads"], m["kv_heads"], m["head_dim"]
        seqlens, total = self._seq_lengths(graph, m["mask"])
        new_nodes = []

        def flat(value: ir.Value, heads: int) -> ir.Value:
            split = producer(value, "Reshape")
            source = split.inputs[0] if split is not None else None
            if (
                split is not None
                and ints(split.inputs[1]) == [0, 0, heads, head_dim]
                and producer(source, "MatMul", "Split", "Add")
            ):
                return source  # a projection's [batch, seq, heads * d] output, only split into heads: as it is
            node = ir.node(
                "Reshape", [value, initializer(graph, f"gqa_shape_{heads * head_dim}", _i64(0, 0, heads * head_dim))]
            )
            new_nodes.append(node)
            return node.outputs[0]

        inputs = [flat(m["q"], q_heads), flat(m["k"], kv_heads), flat(m["v"], kv_heads), m["past_key"], m["past_value"]]
        inputs += [seqlens, total]
        attrs = {
            "num_heads": q_heads,
            "kv_num_heads": kv_heads,
            "scale": m["scale"],
            "local_window_size": m["window"] if m["window"] else -1,
            "do_rotary": int(m["rotary"] is not None),
            "rotary_interleaved": 0,
        }
        if m["softcap"]:
            attrs["softcap"] = m["softcap"]
        if m["rotary"] is not None:
            inputs += list(m["rotary"])
        gqa = ir.node(
            "GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, num_outputs=3, name=f"gqa_{self.report.matched}"
        )
        new_nodes.append(gqa)
        graph.insert_before(m["final"].producer(), new_nodes)
        for old, new in zip((m["final"], m["key"], m["value"]), gqa.outputs, strict=True):
            new.shape, new.type = old.shape, old.type
            replace_output(graph, old, new)
        self.report.matched += 1
        self.report.details.append({
            "node": gqa.name, "heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "sliding_window": m["window"], "rotary_fused": m["rotary"] is not None,
        })  # fmt: skip

    def _seq_lengths(self, graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        """seqlens_k = sum(mask, 1) - 1 and total_sequence_length = mask.shape[1], int32, made once."""
        if id(mask) not in self._lengths:
            one = initializer(graph, "gqa_one_i64", _i64(1))
            axis = initializer(graph, "gqa_axis_1", _i64(1))
            summed = ir.node("ReduceSum", [mask, axis], {"keepdims": 0})
            minus = ir.node("Sub", [summed.outputs[0], one])
            seqlens = ir.node("Cast", [minus.outputs[0]], {"to": INT32}, name="gqa_seqlens_k")
            shape = ir.node("Shape", [mask], {"start": 1, "end": 2})
            total_i64 = ir.node("Squeeze", [shape.outputs[0], initializer(graph, "gqa_axis_0", _i64(0))])
            total = ir.node("Cast", [total_i64.outputs[0]], {"to": INT32}, name="gqa_total_seq_len")
            graph.insert_before(next(iter(graph)), [summed, minus, seqlens, shape, total_i64, total])
            self._lengths[id(mask)] = (seqlens.outputs[0], total.outputs[0])
        return self._lengths[id(mask)]


def _i64(*values: int) -> np.ndarray:
    return np.asarray(values if len(values) > 1 else values[0], dtype=np.int64)


def match_attention(graph: ir.Graph, softmax: ir.Node) -> dict | str:
    """The decomposed attention around `softmax` (form in the module doc), or the reason it is not."""
    if attr_int(softmax, "axis", -1) not in (-1, 4):
        return "softmax is not over the last axis"
    add = producer(softmax.inputs[0], "Add")
    if add is None:
        return "softmax input is not scores + mask"
    for s_idx in (0, 1):
        scores = _scores(add.inputs[s_idx])
        if scores is not None:
            bias = add.inputs[1 - s_idx]
            break
    else:
        return "softmax input is not scaled Q.K^T + mask"
    qk, scale, softcap = scores
    reshape_q = producer(qk.inputs[0], "Reshape")
    key_t = producer(qk.inputs[1], "Transpose")
    if reshape_q is None or key_t is None or attr_ints(key_t, "perm") != [0, 1, 2, 4, 3]:
        return "Q.K^T is not the 5-D grouped form"
    q5 = ints(reshape_q.inputs[1])
    if q5 is None or len(q5) != 5 or q5[0] != 0 or q5[3] != -1 or min(q5[1], q5[2], q5[4]) <= 0:
        return "query reshape is not [0, kv_heads, groups, -1, head_dim]"
    kv_heads, groups, head_dim = q5[1], q5[2], q5[4]
    key_cat = _cache_concat(graph, key_t.inputs[0])
    if key_cat is None:
        return "keys are not Concat(past_key input, k) on axis 2"
    uses = list(softmax.outputs[0].uses())
    pv = uses[0].node if len(uses) == 1 else None
    if pv is None or pv.op_type != "MatMul" or uses[0].idx != 0:
        return "probabilities are not used by one MatMul with V"
    value_cat = _cache_concat(graph, pv.inputs[1])
    if value_cat is None:
        return "values are not Concat(past_value input, v) on axis 2"
    final = _output_chain(pv.outputs[0], kv_heads * groups, head_dim)
    if final is None:
        return "attention output is not reshaped back to [batch, seq, heads * head_dim]"
    return {
        "q_rot": reshape_q.inputs[0], "k_rot": key_cat.inputs[1], "v_bnsh": value_cat.inputs[1], "bias": bias,
        "past_key": key_cat.inputs[0], "past_value": value_cat.inputs[0],
        "key": key_cat.outputs[0], "value": value_cat.outputs[0], "heads_out": final[0], "final": final[1],
        "q_heads": kv_heads * groups, "kv_heads": kv_heads, "head_dim": head_dim,
        "scale": scale, "softcap": softcap,
    }  # fmt: skip


def _match(graph: ir.Graph, softmax: ir.Node) -> dict | str:
    """The core match plus what GroupQueryAttention takes: [batch, seq, heads * d] q/k/v, the rotary
    tables of a RotaryEmbedding pair it can absorb, the attention_mask input, the window."""
    m = match_attention(graph, softmax)
    if isinstance(m, str):
        return m
    q_rot, k_rot, v, bias = m["q_rot"], m["k_rot"], m["v_bnsh"], m["bias"]
    (q_whole, rope_q), (k_whole, rope_k) = (_rotary_of(t, m["head_dim"]) for t in (q_rot, k_rot))
    if (rope_q is None) != (rope_k is None):
        return "only one of q and k is rotated"
    rotary = None
    if rope_q is not None:
        if rope_q.inputs[1:] != rope_k.inputs[1:] or attr_int(rope_q, "interleaved", 0):
            return "q and k use different rotary tables"
        if q_whole is not rope_q.inputs[0]:  # partial rotary: GQA rotates the first 2 * cos_cache.shape[1] dims
            half = rope_q.inputs[2].shape[1] if rope_q.inputs[2].shape is not None else None
            if not isinstance(half, int) or half % 8:
                return f"partial rotary of {half} pairs: GroupQueryAttention needs a multiple of 8"
        q_rot, k_rot, rotary = q_whole, k_whole, (rope_q.inputs[2], rope_q.inputs[3])
    heads = [_bsnh(t) for t in (q_rot, k_rot, v)]
    if any(h is None for h in heads):
        return "q, k or v is not Transpose([batch, seq, heads, head_dim], [0, 2, 1, 3])"
    mask = _mask_input(graph, bias)
    if mask is None:
        return "no attention_mask graph input behind the attention bias"
    return m | {"q": heads[0], "k": heads[1], "v": heads[2], "rotary": rotary, "mask": mask, "window": _window(bias)}


def _rotary_of(value: ir.Value | None, head_dim: int) -> tuple[ir.Value | None, ir.Node | None]:
    """(the value rotated, its RotaryEmbedding) for RotaryEmbedding(x), or for partial rotary
    Concat(RotaryEmbedding(Slice(x, 0, r)), Slice(x, r, head_dim)) on the last axis; (value, None) otherwise."""
    rope = producer(value, "RotaryEmbedding", domain=MS_DOMAIN)
    if rope is not None:
        return rope.inputs[0], rope
    concat = producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or attr_int(concat, "axis") not in (-1, 3):
        return value, None
    rope = producer(concat.inputs[0], "RotaryEmbedding", domain=MS_DOMAIN)
    rot, rest = producer(rope.inputs[0], "Slice") if rope is not None else None, producer(concat.inputs[1], "Slice")
    if rot is None or rest is None or rot.inputs[0] is not rest.inputs[0]:
        return value, None
    a, b = last_axis_slice(rot), last_axis_slice(rest)
    if a is None or b is None or a[0] != 0 or b != (a[1], head_dim):
        return value, None
    return rot.inputs[0], rope


def _scores(value: ir.Value | None) -> tuple[ir.Node, float, float | None] | None:
    """(the Q.K^T MatMul, scale, softcap) for scale * QK^T, optionally soft-capped."""
    softcap = None
    capped = producer(value, "Mul")
    if capped is not None:
        for t_idx in (0, 1):
            tanh = producer(capped.inputs[t_idx], "Tanh")
            div = producer(tanh.inputs[0], "Div") if tanh is not None else None
            cap = scalar(capped.inputs[1 - t_idx])
            if div is not None and cap is not None and scalar(div.inputs[1]) == cap:
                softcap, value = cap, div.inputs[0]
                break
    mul = producer(value, "Mul")
    if mul is None:
        return None
    for m_idx in (0, 1):
        qk = producer(mul.inputs[m_idx], "MatMul")
        scale = scalar(mul.inputs[1 - m_idx])
        if qk is not None and scale is not None:
            return qk, scale, softcap
    return None


def _cache_concat(graph: ir.Graph, value: ir.Value | None) -> ir.Node | None:
    unsq = producer(value, "Unsqueeze")
    concat = producer(unsq.inputs[0], "Concat") if unsq is not None and ints(unsq.inputs[1]) == [2] else None
    if concat is None or attr_int(concat, "axis") not in (2, -2) or len(concat.inputs) != 2:
        return None
    return concat if is_graph_input(graph, concat.inputs[0]) else None


def _output_chain(value: ir.Value, heads: int, head_dim: int) -> tuple[ir.Value, ir.Value] | None:
    """([batch, heads, seq, d] after the first Reshape, [batch, seq, heads * d] at the end)."""
    r1 = _only_use(value, "Reshape")
    t = (
        _only_use(r1.outputs[0], "Transpose")
        if r1 is not None and ints(r1.inputs[1]) == [0, heads, -1, head_dim]
        else None
    )
    r2 = _only_use(t.outputs[0], "Reshape") if t is not None and attr_ints(t, "perm") == [0, 2, 1, 3] else None
    if r2 is None or ints(r2.inputs[1]) not in ([0, 0, heads * head_dim], [0, 0, -1]):
        return None
    return r1.outputs[0], r2.outputs[0]


def _only_use(value: ir.Value, op: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != op or uses[0].idx != 0:
        return None
    return uses[0].node


def _bsnh(value: ir.Value | None) -> ir.Value | None:
    t = producer(value, "Transpose")
    return t.inputs[0] if t is not None and attr_ints(t, "perm") == [0, 2, 1, 3] else None


def _ancestors(value: ir.Value, limit: int = 64) -> list[ir.Node]:
    seen, queue, out = set(), [value], []
    while queue and len(out) < limit:
        node = queue.pop(0).producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        queue.extend(v for v in node.inputs if v is not None)
    return out


def _mask_input(graph: ir.Graph, bias: ir.Value) -> ir.Value | None:
    for node in _ancestors(bias):
        if node.op_type == "Cast":
            src = node.inputs[0]
            if is_graph_input(graph, src) and src.dtype in (ir.DataType.INT64, ir.DataType.INT32):
                return src
    return None


def _window(bias: ir.Value) -> int | None:
    """The sliding window W of a mask that keeps key_pos > query_pos - W, if it has one."""
    for node in _ancestors(bias):
        if node.op_type == "Greater":
            sub = producer(node.inputs[1], "Sub")
            w = scalar(sub.inputs[1]) if sub is not None else None
            if w is not None and w > 0:
                return int(w)
    return None
