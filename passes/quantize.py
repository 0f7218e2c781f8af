"""Weight-only blockwise quantization of MatMul weights into `com.microsoft::MatMulNBits`.

Matches `MatMul(x, W)` where W is a constant [K, N] initializer, or `MatMul(x, Transpose(E))` where E is
a constant [N, K] initializer (a tied head reusing the embedding). Everything else is left alone and
the reason is counted in the report.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from mobilize.passes.quant_primitives import dequantize_blockwise, pack_nbits, pack_zero_points, quantize_blockwise
from mobilize.passes.report import PassReport

MS_DOMAIN = "com.microsoft"


class QuantizeMatMulPass(ir.passes.InPlacePass):
    def __init__(
        self,
        bits: int = 4,
        block_size: int = 32,
        symmetric: bool = False,
        min_elements: int = 0,
        weights: Callable[[str], bool] | None = None,
        label: str = "",
        carry_blocks: bool = False,
        accuracy_level: int = 0,
    ):
        """`weights` selects weights by initializer name (default: all). With `carry_blocks`, a weight whose
        value carries a source block grid (meta "block_grid", from a GGUF) keeps that grid exactly, at the
        grid's own bits and block size, instead of being re-rounded."""
        super().__init__()
        self.carry_blocks = carry_blocks
        # MatMulNBits' compute type: 0 the op's default, 4 int8 activations (ONNX Runtime's fast CPU kernels;
        # its 8-bit weights have no fast path without it).
        self.accuracy_level = accuracy_level
        self.bits, self.block_size, self.symmetric, self.min_elements = bits, block_size, symmetric, min_elements
        self.weights = weights
        kind = "sym" if symmetric else "asym"
        self.report = PassReport(f"quantize_matmul{label}(int{bits}, block {block_size}, {kind})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            weight, transposed = self._weight_of(node)
            if weight is None:
                continue
            self._rewrite(graph, node, weight, transposed)
            modified = True
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            _remove_dead(graph)
        return ir.passes.PassResult(model, modified)

    def _weight_of(self, node: ir.Node) -> tuple[ir.Value | None, bool]:
        """The constant weight feeding the MatMul, and whether it is stored [N, K] (behind a Transpose)."""
        b = node.inputs[1]
        transposed = False
        producer = b.producer() if b is not None else None
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and list(producer.attributes.get_ints("perm", [])) == [1, 0]
        ):
            b, transposed = producer.inputs[0], True
        if b is None or b.const_value is None or not b.is_initializer():
            self.report.reject("weight is not a constant initializer")
            return None, False
        if len(b.shape) != 2 or b.dtype != ir.DataType.FLOAT:
            self.report.reject("weight is not a 2-D float tensor")
            return None, False
        if self.weights is not None and not self.weights(b.name or ""):
            self.report.reject("not selected by the recipe")
            return None, False
        if b.shape[0] * b.shape[1] < self.min_elements:
            self.report.reject(f"weight smaller than {self.min_elements} elements")
            return None, False
        return b, transposed

    def _carry(self, weight: ir.Value, w_nk: np.ndarray):
        make_grid = weight.meta.get("block_grid")
        grid = make_grid() if make_grid is not None else None
        if grid is None:
            self.report.reject("no source block grid: re-rounded")
            return None
        codes = _codes_on_grid(w_nk, grid)
        if codes is None:
            self.report.reject("weights off the source grid: re-rounded")
            return None
        return (*codes, grid.bits, grid.block_size)

    def _rewrite(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, transposed: bool) -> None:
        w = weight.const_value.numpy()
        w_nk = w if transposed else w.T  # MatMulNBits wants [N, K]
        n, k = w_nk.shape
        carried = self._carry(weight, w_nk) if self.carry_blocks else None
        if carried is not None:
            q, scale, zero_point, bits, block_size = carried
        else:
            bits, block_size = self.bits, self.block_size
            q, scale, zero_point = quantize_blockwise(w_nk, bits, block_size, self.symmetric)
        err = dequantize_blockwise(q, scale, zero_point, k) - w_nk
        self.report.matched += 1
        self.report.details.append({
            "weight": weight.name,
            "shape": [n, k],
            "bits": bits,
            "block_size": block_size,
            "carried_from_source": carried is not None,
            "rel_rms_error": float(np.sqrt((err**2).mean() / max((w_nk**2).mean(), 1e-30))),
            "max_abs_error": float(np.abs(err).max()),
        })  # fmt: skip
        base = f"{weight.name}.q{bits}b{block_size}"
        inputs = [
            node.inputs[0],
            _initializer(graph, base + ".qweight", pack_nbits(q, bits)),
            _initializer(graph, base + ".scales", scale.reshape(-1).astype(np.float32)),
        ]
        if zero_point.dtype != np.uint8:  # a float zero point per block (Q4_K's w = s * q - m)
            inputs.append(_initializer(graph, base + ".zero_points", zero_point.reshape(-1).astype(np.float32)))
        elif carried is not None or not self.symmetric:
            inputs.append(_initializer(graph, base + ".zero_points", pack_zero_points(zero_point, bits)))
        new = ir.node(
            "MatMulNBits",
            inputs,
            attributes={"K": k, "N": n, "bits": bits, "block_size": block_size, "accuracy_level": self.accuracy_level},
            domain=MS_DOMAIN,
            name=(node.name or "") + "_nbits",
        )
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)


def _codes_on_grid(w_nk: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The integer codes of w on a source grid, or None if w does not lie on it (then it is re-rounded)."""
    n, k = w_nk.shape
    if k % grid.block_size or grid.scale.shape != (n, k // grid.block_size):
        return None
    blocks = w_nk.reshape(n, -1, grid.block_size)
    scale, zp = grid.scale[..., None], grid.zero_point[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale != 0, np.round(blocks / np.where(scale != 0, scale, 1) + zp), 0)
    if q.min() < 0 or q.max() > (1 << grid.bits) - 1:
        return None
    q = q.astype(np.uint8)
    exact = np.abs((q - zp) * scale - blocks).max() <= 1e-5 * max(float(np.abs(w_nk).max()), 1e-30)
    if not exact:
        return None
    integral = np.array_equal(grid.zero_point, np.round(grid.zero_point))
    zero_point = grid.zero_point.astype(np.uint8) if integral else grid.zero_point.astype(np.float32)
    return q, grid.scale.astype(np.float32), zero_point


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:  # the same weight quantized once, shared by every user
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value


def _remove_dead(graph: ir.Graph) -> None:
    """Drop nodes and initializers nothing uses any more (the fp32 weights that were replaced)."""
    outputs = set(graph.outputs)
    for node in reversed(list(graph)):
        if all(not v.uses() and v not in outputs for v in node.outputs):
            graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in outputs:
            del graph.initializers[name]
