"""Weight-only blockwise quantization of MatMul weights into `com.microsoft::MatMulNBits`.

Matches `MatMul(x, W)` where W is a constant [K, N] initializer, or `MatMul(x, Transpose(E))` where E is
a constant [N, K] initializer (a tied head reusing the embedding). Everything else is left alone and
the reason is counted in the report.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from mobilize.compiler.errors import MobilizeError
from mobilize.passes.graph import MS_DOMAIN, initializer, remove_dead, std_nodes
from mobilize.passes.quant_primitives import (
    codes_on_grid,
    error_stats,
    pack_nbits,
    pack_zero_points,
    quantize_blockwise,
    zero_point_correction,
)
from mobilize.passes.report import PassReport

_CORRECTION = "mobilize.zero_point_correction"


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
        importance: Callable[[str], np.ndarray | None] | None = None,
        wide_block_size: int = 0,
        widen_below: int = 0,
    ):
        """`weights` selects weights by initializer name (default: all). With `carry_blocks`, a weight whose
        value carries a source block grid (meta "block_grid", from a GGUF) keeps that grid exactly, at the
        grid's own bits and block size, instead of being re-rounded. `importance` gives a weight's mean
        square input per channel (calibration): re-rounded weights then weigh each channel's error by it.

        `wide_block_size`: a carried grid wider than `bits` (Q5_0, Q6_K, Q8_0) is stored as 8-bit symmetric
        blocks of this size instead of its own blocks of 32 (re-rounded: 8 bits over a 5-8-bit grid, relative
        error ~0.6%). One fp32 scale per 128 weights instead of a scale and zero point per 32: 8.25 bits per
        weight instead of 9.25, and ONNX Runtime's int8 kernel runs faster on longer blocks.
        `widen_below`: a Q4_K weight (4-bit with a float zero point per block, exact only with a correction
        subgraph of 4 ops) with fewer elements than this takes that 8-bit form too: below a few million
        weights, the correction's fixed cost per token exceeds the time of the extra bytes."""
        super().__init__()
        self.carry_blocks = carry_blocks
        self.carry_wider = carry_wider  # also carry grids with more bits than `bits` (else re-round them)
        # MatMulNBits' compute type: 0 the op's default, 4 int8 activations (ONNX Runtime's fast CPU kernels;
        # its 8-bit weights have no fast path without it).
        self.accuracy_level = accuracy_level
        self.bits, self.block_size, self.symmetric, self.min_elements = bits, block_size, symmetric, min_elements
        self.weights = weights
        self.importance = importance
        self.wide_block_size, self.widen_below = wide_block_size, widen_below
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
        if b.meta.get(_CORRECTION):
            self.report.reject("a zero-point correction (already quantized)")
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
        return make

    def _plan(self, weight: ir.Value) -> tuple[str, int, int, str]:
        """How a weight will be stored, decided from its metadata before any of its bytes are read:
        (how: codes | grid | round, bits, block_size, zero points: none | uint8 | float)."""
        form = weight.meta.get("block_form") if self.carry_blocks else None
        if form is not None and self.wide_block_size:
            wider = form[0] > self.bits and self.carry_wider
            small_grid4 = form[0] == 4 and weight.shape[0] * weight.shape[1] < self.widen_below
            if wider or small_grid4:
                return "round", 8, self.wide_block_size, "none"
        if self.carry_blocks and self._source_codes(weight) is not None:
            return "codes", 8, weight.meta["block_form"][1], "uint8"
        if form is not None and not self.carry_wider and form[0] > self.bits:
            self.report.reject(f"source grid has {form[0]} bits: re-rounded to {self.bits}")
        elif form is not None and weight.meta.get("block_grid") is not None:
            # Q4_K is the one 4-bit grid, with a float zero point per block (w = s * q - m)
            return "grid", form[0], form[1], "float" if form[0] == 4 else "uint8"
        elif self.carry_blocks:
            self.report.reject("no source block grid: re-rounded")
        return "round", self.bits, self.block_size, "none" if self.symmetric else "uint8"

    def _rewrite(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, transposed: bool) -> None:
        """MatMulNBits in place of the MatMul. The quantized tensors are lazy: the weight is read and
        quantized when the model is written, one weight at a time, so an export holds at most a few
        weights in memory whatever the model's size; the error statistics fill the report then."""
        how, bits, block_size, zp_kind = self._plan(weight)
        n, k = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        n_blocks = -(-k // block_size)
        entry = {"weight": weight.name, "shape": [n, k], "bits": bits, "block_size": block_size,
                 "carried_from_source": how != "round"}  # fmt: skip
        self.report.matched += 1
        self.report.details.append(entry)
        parts = _Parts(lambda: self._quantize(weight, transposed, how, bits, block_size, zp_kind, entry))
        base = f"{weight.name}.q{bits}b{block_size}"
        inputs = [
            node.inputs[0],
            _lazy(graph, base + ".qweight", ir.DataType.UINT8, (n, n_blocks, block_size * bits // 8), parts),
            _lazy(graph, base + ".scales", ir.DataType.FLOAT, (n * n_blocks,), parts),
        ]
        if zp_kind == "uint8":
            zp_len = n * n_blocks if bits == 8 else n * ((n_blocks + 1) // 2)
            inputs.append(_lazy(graph, base + ".zero_points", ir.DataType.UINT8, (zp_len,), parts))
        new = ir.node(
            "MatMulNBits",
            inputs,
            attributes={"K": k, "N": n, "bits": bits, "block_size": block_size, "accuracy_level": self.accuracy_level},
            domain=MS_DOMAIN,
            name=(node.name or "") + "_nbits",
        )
        nodes = [new]
        if zp_kind == "float":
            correction = _lazy(graph, base + ".zero_point_correction", ir.DataType.FLOAT, (n_blocks, n), parts)
            nodes += _zero_point_correction(graph, n_blocks, node.inputs[0], new.outputs[0], correction)
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, node.outputs, nodes[-1].outputs)

    def _quantize(self, weight, transposed, how, bits, block_size, zp_kind, entry) -> dict[str, np.ndarray]:
        """The stored arrays of one weight, by name suffix; its error statistics into `entry`."""
        if how == "codes":  # exact by construction: the stored values are (q - zero_point) * scale
            q, scale, zero_point = self._source_codes(weight)()
            stats = {"rel_rms_error": 0.0, "max_abs_error": 0.0}
        else:
            w = weight.const_value.numpy()
            w_nk = w if transposed else w.T  # MatMulNBits wants [N, K]
            if how == "grid":
                codes = codes_on_grid(w_nk, weight.meta["block_grid"]())
                if codes is None:
                    raise MobilizeError(f"{weight.name}: the weights are not on their source's block grid")
                q, scale, zero_point = codes
                if zp_kind == "float":
                    zero_point = zero_point.astype(np.float32)
            else:
                h = self.importance(weight.name or "") if self.importance is not None else None
                entry["calibrated"] = h is not None
                q, scale, zero_point = quantize_blockwise(w_nk, bits, block_size, zp_kind == "none", h)
            stats = error_stats(w_nk, q, scale, zero_point)
            del w, w_nk
        entry.update(stats)
        out = {".qweight": pack_nbits(q, bits), ".scales": scale.reshape(-1).astype(np.float32)}
        if zp_kind == "uint8":
            out[".zero_points"] = pack_zero_points(zero_point.astype(np.uint8), bits)
        elif zp_kind == "float":
            out[".zero_point_correction"] = np.ascontiguousarray(zero_point_correction(scale, zero_point, bits).T)
        return out


class _Parts:
    """One weight's quantized arrays, computed on the first request and handed out once each (so each is
    freed after the writer takes it); a part asked for again (a cleanup read) is recomputed."""

    def __init__(self, compute: Callable[[], dict[str, np.ndarray]]) -> None:
        self.compute, self.ready = compute, {}

    def take(self, suffix: str) -> np.ndarray:
        if suffix not in self.ready:
            self.ready = self.compute()
        return self.ready.pop(suffix)


def _lazy(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...], parts: _Parts) -> ir.Value:
    suffix = name[name.rindex(".") :]

    def load() -> ir.Tensor:
        arr = parts.take(suffix)
        if arr.shape != shape:
            raise MobilizeError(f"{name}: quantized to {arr.shape} where {shape} was planned")
        return ir.Tensor(arr)

    value = ir.Value(name=name, const_value=ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name))
    value.shape, value.type = ir.Shape(shape), ir.TensorType(dtype)
    graph.register_initializer(value)
    return value


def _zero_point_correction(graph, n_blocks: int, x, y, correction: ir.Value) -> list[ir.Node]:
    """Float zero points, exactly, on ONNX Runtime's fast integer path: the MatMulNBits runs with its
    default zero point z0 = 2**(bits-1), and the difference s * (z0 - zp), one number per block, is
    added back as sum(x over the block) @ that [K / block, N] matrix: w = s(q - zp) = s(q - z0) + s(z0 - zp)."""
    correction.meta[_CORRECTION] = True  # not a weight to quantize on a later run
    shape = initializer(graph, f"block_shape_{n_blocks}", np.asarray([0, 0, n_blocks, -1], np.int64))
    axis = initializer(graph, "axis_last", np.asarray([-1], np.int64))
    blocks = ir.node("Reshape", [x, shape])
    sums = ir.node("ReduceSum", [blocks.outputs[0], axis], {"keepdims": 0})
    offset = ir.node("MatMul", [sums.outputs[0], correction])
    total = ir.node("Add", [y, offset.outputs[0]])
    return [blocks, sums, offset, total]
