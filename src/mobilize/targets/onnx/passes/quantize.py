"""Weight-only blockwise quantization of MatMul weights into `com.microsoft::MatMulNBits`.

Matches `MatMul(x, W)` where W is a constant [K, N] initializer, or `MatMul(x, Transpose(E))` where E is
a constant [N, K] initializer (a tied head reusing the embedding). Everything else is left alone and
the reason is counted in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from mobilize.errors import MobilizeError
from mobilize.quant.plan import TargetCaps, WeightForm, plan_weight
from mobilize.quant.primitives import (
    ROWS,
    codes_on_grid,
    dequantize_blockwise,
    error_stats,
    pack_nbits,
    pack_zero_points,
    quantize_blockwise,
    zero_point_correction,
)
from mobilize.quant.recipes import WeightQuant
from mobilize.targets.onnx.caps import ONNX_CAPS
from mobilize.targets.onnx.passes.graph import MS_DOMAIN, WRITE_LAST, initializer, remove_dead, source_grid, std_nodes
from mobilize.targets.onnx.passes.report import ReportingPass

DEFAULT = WeightQuant(4, 32, False)

_CORRECTION = "mobilize.zero_point_correction"
# meta key on a tied table whose head is one plain MatMulNBits: its quantized bytes, for the lookup to share
TIED_HEAD = "mobilize.tied_head"


class QuantizeMatMulPass(ReportingPass):
    runs_after = ("PackMatMulPass",)  # packed weights are quantized as one
    def __init__(
        self,
        quant: WeightQuant = DEFAULT,
        *,
        carry_source_blocks: bool = False,
        min_elements: int = 0,
        weights: Callable[[str], bool] | None = None,
        label: str = "",
        accuracy_level: int = 0,
        importance: Callable[[str], np.ndarray | None] | None = None,
        caps: TargetCaps = ONNX_CAPS,
    ):
        """MatMulNBits for every constant MatMul weight `weights` selects (by initializer name; default all), each
        stored as the weight planner (quant/plan.py) decides from `quant` (the recipe's form for these weights),
        the recipe's `carry_source_blocks` and the weight's source grid (meta "block_form"/"block_kinds", from a
        GGUF). `importance` gives a weight's mean square input per channel (calibration): re-rounded weights then
        weigh each channel's error by it, and a split weight ranks its channels by it.

        Forms the planner can choose, for a GGUF source: the source grid kept exactly (Q5_0/Q6_K/Q8_0 as 8-bit
        blocks with zero points, Q4_K as 4-bit with float zero points added back by a correction subgraph), the
        Q8_0 codes as they are, or (where the recipe keeps wider grids at 8 bits) 8-bit symmetric blocks of
        `caps.wide_block_size`, small Q4_K tensors likewise (`caps.widen_below`; see ONNX_CAPS for why).
        A split weight keeps its form for the `split_keep` input channels of largest mean square input and
        takes `split_rest` for the others: a Gather puts the kept channels first, a Split parts them, two
        MatMulNBits and an Add follow. An output head's input has a few loud channels (Gemma 3 270M: mean
        squares from 2 to 1,700; the top 256 of 640 carry ~80% of the sum), where 4-bit error costs the most."""
        super().__init__()
        self.quant, self.carry_source_blocks, self.min_elements = quant, carry_source_blocks, min_elements
        # MatMulNBits' compute type: 0 the op's default, 4 int8 activations (ONNX Runtime's fast CPU kernels;
        # its 8-bit weights have no fast path without it).
        self.accuracy_level = accuracy_level
        self.weights = weights
        self.importance = importance
        self.caps = caps
        kind = "sym" if quant.symmetric else "asym"
        self._name = f"quantize_matmul{label}(int{quant.bits}, block {quant.block_size}, {kind})"

    def plan(self, weight: ir.Value, n: int, k: int) -> WeightForm:
        """The weight's storage, from its metadata, before any of its bytes are read."""
        grid = source_grid(weight)
        statistics = self.importance is not None
        planned = plan_weight((n, k), grid, self.quant, self.carry_source_blocks, self.caps, statistics)
        if planned is None:
            raise MobilizeError(f"{weight.name}: the recipe keeps it float, yet it was selected for quantization")
        return planned

    def run(self, model: ir.Model) -> bool:
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
        return modified

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

    def _rewrite(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, transposed: bool) -> None:
        """MatMulNBits in place of the MatMul. The quantized tensors are lazy: the weight is read and
        quantized when the model is written, one weight at a time, so an export holds at most a few
        weights in memory whatever the model's size; the error statistics fill the report then."""
        n, k = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        form = self.plan(weight, n, k)
        how = {"rounded": "round", "grid": "grid", "codes": "codes"}[form.source]
        bits, block_size, zp_kind = form.bits, form.block_size, form.zero_point
        if form.declined:
            self.report.reject(form.note)
        entry = {"weight": weight.name, "shape": [n, k], "bits": bits, "block_size": block_size,
                 "carried_from_source": form.exact, "plan": form.describe()}  # fmt: skip
        self.report.matched += 1
        self.report.details.append(entry)
        x, name = node.inputs[0], (node.name or "") + "_nbits"
        if form.split is not None:
            nodes = self._split_nodes(graph, x, weight, transposed, n, k, entry, name, form)
        else:
            parts = _Parts(lambda: self._quantize(weight, transposed, how, bits, block_size, zp_kind, entry))
            base = f"{weight.name}.q{bits}b{block_size}"
            nodes = self._nbits(graph, x, base, parts, "", n, k, bits, block_size, zp_kind, name)
            if transposed and (bits == 8 or zp_kind == "none") and zp_kind != "float" and k % block_size == 0:
                parts.twice.update({".scales", ".zero_points"})  # the lookup's own shapes of them
                weight.meta[TIED_HEAD] = {"qweight": nodes[0].inputs[1], "parts": parts, "base": base, "form": form}
            if zp_kind == "float":
                shape = (-(-k // block_size), n)
                correction = lazy_part(graph, base + ".zero_point_correction", ir.DataType.FLOAT, shape, parts)
                nodes += _zero_point_correction(graph, shape[0], x, nodes[-1].outputs[0], correction)
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, node.outputs, nodes[-1].outputs)

    def _nbits(self, graph, x, base, parts, key, n, k, bits, block_size, zp_kind, name) -> list[ir.Node]:
        """One MatMulNBits over x with lazy quantized inputs (`key` tells a split weight's parts apart)."""
        n_blocks = -(-k // block_size)
        inputs = [
            x,
            lazy_part(graph, base + ".qweight", ir.DataType.UINT8, (n, n_blocks, block_size * bits // 8), parts, key),
            lazy_part(graph, base + ".scales", ir.DataType.FLOAT, (n * n_blocks,), parts, key),
        ]
        if zp_kind == "uint8":
            zp_len = n * n_blocks if bits == 8 else n * ((n_blocks + 1) // 2)
            inputs.append(lazy_part(graph, base + ".zero_points", ir.DataType.UINT8, (zp_len,), parts, key))
        attributes = {"K": k, "N": n, "bits": bits, "block_size": block_size, "accuracy_level": self.accuracy_level}
        return [ir.node("MatMulNBits", inputs, attributes=attributes, domain=MS_DOMAIN, name=name)]

    def _split_nodes(self, graph, x, weight, transposed, n, k, entry, name, form: WeightForm) -> list[ir.Node]:
        keep, rest = form.split.keep, form.split.rest
        forms = {
            "kept": (keep, form.bits, form.block_size, form.zero_point),
            "rest": (k - keep, rest.bits, rest.block_size, rest.zero_point),
        }
        entry["split"] = {part: {"channels": c, "bits": b, "block_size": bs} for part, (c, b, bs, _) in forms.items()}
        parts = _Parts(lambda: self._quantize_split(weight, transposed, forms, entry))
        base = f"{weight.name}.split{keep}"
        start = len(graph.initializers)
        order = lazy_part(graph, base + ".channels", ir.DataType.INT64, (k,), parts)
        sizes = initializer(graph, f"split_sizes_{keep}_{k - keep}", np.asarray([keep, k - keep], np.int64))
        gather = ir.node("Gather", [x, order], {"axis": -1}, name=name + "_channels")
        split = ir.node("Split", [gather.outputs[0], sizes], {"axis": -1}, num_outputs=2, name=name + "_split")
        nodes = [gather, split]
        for i, (part, (c, bits, block_size, zp_kind)) in enumerate(forms.items()):
            nodes += self._nbits(graph, split.outputs[i], f"{base}.{part}.q{bits}b{block_size}", parts, part + ".",
                                 n, c, bits, block_size, zp_kind, f"{name}_{part}")  # fmt: skip
        nodes.append(ir.node("Add", [nodes[2].outputs[0], nodes[3].outputs[0]], name=name + "_sum"))
        if transposed and all(c % b == 0 for c, _, b, _ in forms.values()):  # a tied head: the lookup may read its
            # two parts whole (tests/test_shared_table.py)
            parts.twice.update({"kept..scales", "rest..scales"})
            weight.meta[TIED_HEAD] = {"split": forms, "parts": parts, "base": base, "n": n, "k": k,
                                      "qweights": [nodes[2].inputs[1], nodes[3].inputs[1]], "form": form}  # fmt: skip
        for value in list(graph.initializers.values())[start:]:
            value.meta[WRITE_LAST] = True  # quantized only once calibration is done
        return nodes

    def _quantize_split(self, weight, transposed, forms, entry) -> dict[str, np.ndarray]:
        """A split weight's arrays: the channel order, then each part's, a chunk of rows at a time."""
        h = self.importance(weight.name or "")
        if h is None:
            raise MobilizeError(f"{weight.name}: no calibration statistics to choose its channels by")
        rows_of, n, k = _row_reader(weight, transposed)
        ranked = np.argsort(-np.asarray(h, np.float64), kind="stable")
        keep = forms["kept"][0]
        order = np.concatenate([np.sort(ranked[:keep]), np.sort(ranked[keep:])]).astype(np.int64)
        arrays = {}
        for part, (c, bits, block_size, _) in forms.items():
            n_blocks = -(-c // block_size)
            arrays[part] = (np.empty((n, n_blocks, block_size * bits // 8), np.uint8),
                            np.empty((n, n_blocks), np.float32), np.empty((n, n_blocks), np.uint8))  # fmt: skip

        def rows_from(start: int) -> tuple[float, float, float]:  # (sum w^2, sum error^2, max |error|)
            rows = slice(start, start + ROWS)
            chunk = np.take(rows_of(rows), order, axis=1).astype(np.float32, copy=False)  # the kept channels first
            sums = [float(np.vdot(chunk, chunk)), 0.0, 0.0]
            first = 0
            for part, (c, bits, block_size, zp_kind) in forms.items():
                piece = chunk[:, first : first + c]
                first += c
                q, scale, zero_point = arrays[part]
                codes, scale[rows], zero_point[rows] = quantize_blockwise(piece, bits, block_size, zp_kind == "none")
                q[rows] = pack_nbits(codes, bits)
                err = dequantize_blockwise(codes, scale[rows], zero_point[rows], c)
                err -= piece
                sums[1] += float(np.vdot(err, err))
                sums[2] = max(sums[2], float(np.abs(err).max(initial=0.0)))
            return sums[0], sums[1], sums[2]

        # Two threads over the row chunks (numpy releases the interpreter lock on arrays this size): the split
        # head is the last weight written, when the export has nothing else running.
        with ThreadPoolExecutor(2) as pool:
            sums = list(pool.map(rows_from, range(0, n, ROWS)))
        rows_of = None  # the weight (or its source codes) can go before the packed arrays are written
        clear = getattr(weight.meta.get("block_codes"), "cache_clear", None)
        if clear is not None:  # the codes computed once for the embedding and the head: not needed again
            clear()
        sq_w, sq_err = sum(s[0] for s in sums), sum(s[1] for s in sums)
        entry.update({"rel_rms_error": (sq_err / max(sq_w, 1e-30)) ** 0.5, "max_abs_error": max(s[2] for s in sums)})
        out = {".channels": order, ".inverse_channels": np.argsort(order).astype(np.int64)}
        for part, (q, scale, zero_point) in arrays.items():
            out[f"{part}..qweight"], out[f"{part}..scales"] = q, scale.reshape(-1)
            if forms[part][3] == "uint8":
                out[f"{part}..zero_points"] = pack_zero_points(zero_point, forms[part][1])
                out[f"{part}..lookup_zero_points"] = zero_point[..., None]  # one per block (a low nibble at 4 bits)
        return out

    def _quantize(self, weight, transposed, how, bits, block_size, zp_kind, entry) -> dict[str, np.ndarray]:
        """The stored arrays of one weight, by name suffix; its error statistics into `entry`."""
        if how == "codes":  # exact by construction: the stored values are (q - zero_point) * scale
            q, scale, zero_point = weight.meta["block_codes"]()
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


def _row_reader(weight: ir.Value, transposed: bool) -> tuple[Callable[[slice], np.ndarray], int, int]:
    """(rows -> those rows of the weight as [N, K] float32, N, K). A Q8_0 table stored [N, K] (a tied head)
    is read from its int8 codes a chunk at a time, the same values as its float form (int8 times the fp32
    block scale) without the float copy (a 262k-token table: 671 MB)."""
    make = weight.meta.get("block_codes") if transposed else None
    if make is not None:
        codes, scale, zero_point = make()  # [N, K / block, block], w = (code - zero point) * scale
        n, k = codes.shape[0], codes.shape[1] * codes.shape[2]
        offset = zero_point.astype(np.float32)[..., None]

        def rows_of(rows: slice) -> np.ndarray:
            values = codes[rows].astype(np.float32)
            values -= offset[rows]
            values *= scale[rows][..., None]
            return values.reshape(-1, k)

        return rows_of, n, k
    w = weight.const_value.numpy()
    w_nk = w if transposed else w.T
    return (lambda rows: w_nk[rows]), w_nk.shape[0], w_nk.shape[1]


class _Parts:
    """One weight's quantized arrays, computed on the first request and handed out once each (so each is
    freed after the writer takes it); a part asked for again (a cleanup read) is recomputed."""

    def __init__(self, compute: Callable[[], dict[str, np.ndarray]]) -> None:
        self.compute, self.ready = compute, {}
        self.twice: set[str] = set()  # parts two initializers are made of (kept for the second take)
        self.spare: dict[str, np.ndarray] = {}

    def take(self, suffix: str) -> np.ndarray:
        if suffix in self.spare:
            return self.spare.pop(suffix)
        if suffix not in self.ready:
            self.ready = self.compute()
        arr = self.ready.pop(suffix)
        if suffix in self.twice:
            self.spare[suffix] = arr
        return arr


def lazy_part(
    graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...], parts: _Parts, key: str = "",
    suffix: str | None = None,
) -> ir.Value:
    reshaped = suffix is not None  # another initializer's part, in this one's shape
    suffix = suffix or key + name[name.rindex(".") :]  # the part's name in `parts`

    def load() -> ir.Tensor:
        arr = parts.take(suffix)
        if reshaped and arr.size == np.prod(shape):
            arr = arr.reshape(shape)
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
