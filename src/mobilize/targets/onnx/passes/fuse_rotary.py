"""Rotary embedding fusion: `x * cos + rotate_half(x) * sin`, with cos/sin computed in the graph from
position ids and constant inverse frequencies, becomes one op reading precomputed cos/sin tables.

Matched form (head axis 1, what transformers and our builder emit):
    f = Unsqueeze(Cast(position_ids), -1) * inv_freq;  e = Concat(f, f, -1)
    cos = Unsqueeze(Cos(e) [* m], 1);  sin = Unsqueeze(Sin(e) [* m], 1)   (m: longrope's magnitude, a scalar)
    y = x * cos + Concat(-x[..., h:], x[..., :h]) * sin
ONNX Runtime: `com.microsoft::RotaryEmbedding`; standard ONNX (`std=True`): opset-23 `RotaryEmbedding`.
The tables hold `max_seq_len` positions, so the package cannot address positions past it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

from mobilize.targets.onnx.passes.graph import (
    MS_DOMAIN,
    attr_int,
    initializer,
    ints,
    last_axis_slice,
    producer,
    remove_dead,
    replace_output,
    require_std_opset,
    small_const,
    std_nodes,
)
from mobilize.targets.onnx.passes.report import ReportingPass


def rotary_tables(inv_freq: np.ndarray, max_seq_len: int, magnitude: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_seq_len, rotary dims / 2], computed as the graph did (fp32 angles, then the magnitude)."""
    angles = np.arange(max_seq_len, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    if magnitude != 1.0:
        cos, sin = cos * np.float32(magnitude), sin * np.float32(magnitude)
    return cos, sin


class FuseRotaryPass(ReportingPass):
    def __init__(self, max_seq_len: int, std: bool = False):
        super().__init__()
        self.max_seq_len, self.std = max_seq_len, std
        self._name = f"fuse_rotary(max_seq_len {max_seq_len}" + (", opset 23)" if std else ")")

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        for node in std_nodes(graph, "Add"):
            self._fuse(graph, node)
        if self.report.matched:
            if self.std:
                require_std_opset(model)
            else:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            remove_dead(graph)
        return self.report.matched > 0

    def _fuse(self, graph: ir.Graph, add: ir.Node) -> None:
        for cos_idx in (0, 1):
            matched = _match(add.inputs[cos_idx], add.inputs[1 - cos_idx])
            if matched is None:
                continue
            if isinstance(matched, str):
                self.report.reject(matched)
                return
            x, positions, inv_freq, magnitude = matched
            cos, sin = rotary_tables(inv_freq, self.max_seq_len, magnitude)
            digest = hashlib.sha1(inv_freq.tobytes() + (np.float32(magnitude).tobytes() if magnitude != 1.0 else b""))
            key = f"rotary_{digest.hexdigest()[:10]}_{self.max_seq_len}"
            cos_v = initializer(graph, key + ".cos", cos)
            sin_v = initializer(graph, key + ".sin", sin)
            if self.std:
                new = ir.node(
                    "RotaryEmbedding",
                    [x, cos_v, sin_v, positions],
                    {"interleaved": 0},
                    name=f"{key}_{self.report.matched}",
                )
            else:
                new = ir.node(
                    "RotaryEmbedding",
                    [x, positions, cos_v, sin_v],
                    {"interleaved": 0},
                    domain=MS_DOMAIN,
                    name=f"{key}_{self.report.matched}",
                )
            graph.insert_before(add, new)
            new.outputs[0].shape, new.outputs[0].type = add.outputs[0].shape, add.outputs[0].type
            replace_output(graph, add.outputs[0], new.outputs[0])
            self.report.matched += 1
            return


def _match(cos_term: ir.Value | None, sin_term: ir.Value | None):
    """(x, position_ids, inv_freq, magnitude) if the two Add operands are x*cos and rotate_half(x)*sin."""
    mul_c, mul_s = producer(cos_term, "Mul"), producer(sin_term, "Mul")
    if mul_c is None or mul_s is None:
        return None
    cos = _operand_times_trig(mul_c, "Cos")
    sin = _operand_times_trig(mul_s, "Sin")
    if cos is None or sin is None:
        return None
    (x, (cos_node, magnitude)), (rotated, (sin_node, sin_magnitude)) = cos, sin
    if cos_node.inputs[0] is not sin_node.inputs[0]:
        return "cos and sin are of different angles"
    if magnitude != sin_magnitude:
        return "cos and sin are scaled differently"
    if not _is_rotate_half(rotated, x):
        return "the sin term is not rotate_half(x) of the cos term's x"
    angles = _angles(cos_node.inputs[0])
    if angles is None:
        return "angles are not Concat(pos * inv_freq) twice with constant inv_freq"
    return (x, *angles, magnitude)


def _operand_times_trig(mul: ir.Node, op: str) -> tuple[ir.Value, tuple[ir.Node, float]] | None:
    """(a, (the Cos/Sin node, magnitude)) for Mul(a, Unsqueeze(op(angles) [* m], 1)) in either operand order."""
    for idx in (0, 1):
        trig = _trig(mul.inputs[1 - idx], op)
        if trig is not None:
            return mul.inputs[idx], trig
    return None


def _trig(value: ir.Value | None, op: str) -> tuple[ir.Node, float] | None:
    unsq = producer(value, "Unsqueeze")
    if unsq is None or ints(unsq.inputs[1]) != [1]:
        return None
    trig = producer(unsq.inputs[0], op)
    if trig is not None:
        return trig, 1.0
    scaled = producer(unsq.inputs[0], "Mul")
    for t_idx in (0, 1) if scaled is not None else ():
        trig, m = producer(scaled.inputs[t_idx], op), small_const(scaled.inputs[1 - t_idx])
        if trig is not None and m is not None and m.size == 1 and m.dtype == np.float32:
            return trig, float(m.reshape(-1)[0])
    return None


def _is_rotate_half(rotated: ir.Value | None, x: ir.Value) -> bool:
    concat = producer(rotated, "Concat")
    if concat is None or len(concat.inputs) != 2 or attr_int(concat, "axis") not in (-1, 3):
        return False
    neg = producer(concat.inputs[0], "Neg")
    if neg is None:
        return False
    second, first = producer(neg.inputs[0], "Slice"), producer(concat.inputs[1], "Slice")
    if second is None or first is None or second.inputs[0] is not x or first.inputs[0] is not x:
        return False
    s1, s2 = last_axis_slice(first), last_axis_slice(second)
    return s1 is not None and s2 is not None and s1[0] == 0 and s1[1] == s2[0] and s2[1] >= 2 * s1[1]


def _angles(value: ir.Value | None) -> tuple[ir.Value, np.ndarray] | None:
    concat = producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    mul = producer(concat.inputs[0], "Mul")
    if mul is None:
        return None
    for f_idx in (0, 1):
        inv_freq = small_const(mul.inputs[f_idx])
        if inv_freq is not None and inv_freq.dtype == np.float32:
            pos = mul.inputs[1 - f_idx]
            break
    else:
        return None
    unsq = producer(pos, "Unsqueeze")
    cast = producer(unsq.inputs[0], "Cast") if unsq is not None and ints(unsq.inputs[1]) == [-1] else None
    if cast is None:
        return None
    positions = cast.inputs[0]
    if positions is None or positions.dtype != ir.DataType.INT64:
        return None
    return positions, inv_freq.reshape(-1)
