"""Weight-only blockwise quantization of MatMul weights into `com.microsoft::MatMulNBits`.

Matches `MatMul(x, W)` where W is a constant [K, N] initializer, or `MatMul(x, Transpose(E))` where E is
a constant [N, K] initializer (a tied head reusing the embedding). Everything else is left alone and
the reason is counted in the report.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from mobilize.passes.graph import MS_DOMAIN, initializer, remove_dead, std_nodes
from mobilize.passes.quant_primitives import error_stats, pack_nbits, pack_zero_points, quantize_blockwise
from mobilize.passes.report import PassReport


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
        carry_wider: bool = True,
        accuracy_level: int = 0,
    ):
        """`weights` selects weights by initializer name (default: all). With `carry_blocks`, a weight whose
        value carries a source block grid (meta "block_grid", from a GGUF) keeps that grid exactly, at the
        grid's own bits and block size, instead of being re-rounded."""
        super().__init__()
        self.carry_blocks = carry_blocks
        self.carry_wider = carry_wider  # also carry grids with more bits than `bits` (else re-round them)
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
        for node in std_nodes(graph, "MatMul"):
            weight, transposed = self._weight_of(node)
            if weight is None:
                continue
            self._rewrite(graph, node, weight, transposed)
            modified = True
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            remove_dead(graph)
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

    def _source_codes(self, weight: ir.Value):
        """8-bit codes read straight from the source bytes (Q8_0), when this pass would carry them."""
        make = weight.meta.get("block_codes")
        if make is None or (not self.carry_wider and self.bits < 8):
            return None
        return make()

    def _carry(self, weight: ir.Value, w_nk: np.ndarray):
        form = weight.meta.get("block_form")
        if not self.carry_wider and form is not None and form[0] > self.bits:
            self.report.reject(f"source grid has {form[0]} bits: re-rounded to {self.bits}")
            return None
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
        codes = self._source_codes(weight) if self.carry_blocks else None
        if codes is not None:  # exact by construction: the stored values are (q - zero_point) * scale
            q, scale, zero_point = codes
            n, k, bits, block_size = q.shape[0], q.shape[1] * q.shape[2], 8, q.shape[2]
            carried, stats = True, {"rel_rms_error": 0.0, "max_abs_error": 0.0}
        else:
            w = weight.const_value.numpy()
            w_nk = w if transposed else w.T  # MatMulNBits wants [N, K]
            n, k = w_nk.shape
            carried = self._carry(weight, w_nk) if self.carry_blocks else None
            if carried is not None:
                q, scale, zero_point, bits, block_size = carried
            else:
                bits, block_size = self.bits, self.block_size
                q, scale, zero_point = quantize_blockwise(w_nk, bits, block_size, self.symmetric)
            stats = error_stats(w_nk, q, scale, zero_point)
        self.report.matched += 1
        self.report.details.append({
            "weight": weight.name,
            "shape": [n, k],
            "bits": bits,
            "block_size": block_size,
            "carried_from_source": carried is not None,
            **stats,
        })  # fmt: skip
        base = f"{weight.name}.q{bits}b{block_size}"
        inputs = [
            node.inputs[0],
            initializer(graph, base + ".qweight", pack_nbits(q, bits)),
            initializer(graph, base + ".scales", scale.reshape(-1).astype(np.float32)),
        ]
        float_zp = zero_point.dtype != np.uint8  # a float zero point per block (Q4_K's w = s * q - m)
        if not float_zp and (carried is not None or not self.symmetric):
            inputs.append(initializer(graph, base + ".zero_points", pack_zero_points(zero_point, bits)))
        new = ir.node(
            "MatMulNBits",
            inputs,
            attributes={"K": k, "N": n, "bits": bits, "block_size": block_size, "accuracy_level": self.accuracy_level},
            domain=MS_DOMAIN,
            name=(node.name or "") + "_nbits",
        )
        nodes = [new]
        if float_zp:
            nodes += _zero_point_correction(graph, base, node.inputs[0], new.outputs[0], scale, zero_point, bits)
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, node.outputs, nodes[-1].outputs)


def _zero_point_correction(graph, base, x, y, scale, zero_point, bits) -> list[ir.Node]:
    """Float zero points, exactly, on ONNX Runtime's fast integer path: the MatMulNBits runs with its
    default zero point z0 = 2**(bits-1), and the difference s * (z0 - zp), one number per block, is
    added back as sum(x over the block) @ that [K / block, N] matrix: w = s(q - zp) = s(q - z0) + s(z0 - zp)."""
    n, n_blocks = scale.shape
    delta = (scale * ((1 << (bits - 1)) - zero_point)).astype(np.float32).T  # [n_blocks, N]
    shape = initializer(graph, f"block_shape_{n_blocks}", np.asarray([0, 0, n_blocks, -1], np.int64))
    axis = initializer(graph, "axis_last", np.asarray([-1], np.int64))
    correction = initializer(graph, base + ".zero_point_correction", np.ascontiguousarray(delta))
    blocks = ir.node("Reshape", [x, shape])
    sums = ir.node("ReduceSum", [blocks.outputs[0], axis], {"keepdims": 0})
    offset = ir.node("MatMul", [sums.outputs[0], correction])
    total = ir.node("Add", [y, offset.outputs[0]])
    return [blocks, sums, offset, total]


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
