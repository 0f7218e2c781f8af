"""Weights of a LiteRT model as the recipe stores them, produced lazily at write time.

- fp32: FULLY_CONNECTED weights [N, K] as they are; a tied head shares the embedding's buffer.
- int8: per output channel, symmetric (TFLite's dynamic-range form: float activations, int8 weights,
  one scale per row), for FULLY_CONNECTED; the embedding table per row too, looked up with GATHER
  and scaled back by its row's scale.
- int4: blockwise along K (blocks of the recipe's size, symmetric: TFLite's blockwise form has no zero
  points, fp16 scales [N, K / block]), XNNPACK's qb4w kernels; or per channel when the block is 0.

Each weight is read, quantized and turned into bytes only when the writer reaches its buffer, so at
most one weight is in memory at a time; the error statistics are gathered then, into the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from mobilize.frontend.loader import LoadedModel
from mobilize.frontend.sources.gguf_grid import block_codes, block_grid
from mobilize.quant.calibrate import statistics_for
from mobilize.quant.plan import SourceGrid, WeightForm, plan_embedding, plan_weight, quant_for, searches_scales
from mobilize.quant.primitives import ErrorStats, codes_on_grid, search_blocks, zero_point_correction
from mobilize.quant.recipes import Recipe, WeightQuant
from mobilize.targets.tflite.caps import TFLITE_CAPS
from mobilize.targets.tflite.writer import INT4, Quant, TflGraph

Op = fb.BuiltinOperator
F32 = np.float32
ROWS = 8192  # rows quantized at a time: temporaries stay tens of MB whatever the matrix
EMBEDDING = "model.embed_tokens.weight"


def quantize_sym4_blocks(blocks: np.ndarray, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """blocks [N, n_blocks, block] -> (codes int8 in [-8, 7], fp16 scales [N, n_blocks]): the symmetric
    search of quant/primitives (least squared error among clipped ranges, each refitted; weighted by
    calibration statistics [n_blocks, block] when given), with the scales rounded to fp16 first."""
    q, scale, _ = search_blocks(blocks, 4, True, weight, scale_dtype=np.float16, negative_scales=False)
    return (q.astype(np.int8) - 8).astype(np.int8), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] -> bytes, two per byte, the first in the low nibble (TFLite's INT4 layout)."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


class FcWeights:
    def __init__(self, model: LoadedModel, recipe: Recipe, statistics: Mapping[str, np.ndarray] | None = None) -> None:
        self.cfg, self.ckpt, self.recipe = model.config, model.weights, recipe
        # calibration (quant/calibrate.py): re-rounded 4-bit blocks weigh each input channel's error by it
        self.statistics = statistics
        # a linear layer's scales are searched with the statistics only where the recipe asks (they may be here for
        # the head's split or the smoothing alone)
        self.searched = searches_scales(recipe, TFLITE_CAPS)
        self.stats: dict[str, dict] = {}
        self._corrections: dict[str, int] = {}
        self._scales: dict[tuple[str, int], np.ndarray] = {}
        self._plans: dict[str, WeightForm] = {}  # the planner's form of each weight, by tensor key
        self._block_scales: dict[tuple[int, str], int] = {}  # (graph, key) -> its blockwise scales' tensor
        self._splits: dict[tuple[int, str], dict] = {}  # (graph, name) -> a split head's tensors

    def _load(self, name: str, cols: np.ndarray | None = None) -> np.ndarray:
        """The weight [N, K] in float32; with `cols`, those input channels only (a split head's part)."""
        w = np.asarray(self.ckpt[name].load(), dtype=F32)
        return w if cols is None else np.ascontiguousarray(w[:, cols])

    def _per_channel(self, name: str, bits: int, key: str, scale: np.ndarray, cols: np.ndarray | None = None):
        """Codes of a weight per output channel with the layout's scales, a slice of rows at a time (bytes for
        the writer), the error statistics gathered along."""
        w = self._load(name, cols)
        qmax = (1 << (bits - 1)) - 1
        errors = ErrorStats()
        for start in range(0, w.shape[0], ROWS):
            rows, s = w[start : start + ROWS], scale[start : start + ROWS, None]
            q = np.clip(np.round(rows / s), -qmax, qmax).astype(np.int8)
            err = q.astype(F32) * s
            err -= rows
            errors.add(err, rows)
            yield pack_int4(q) if bits == 4 else q
        self.stats[key] = self._planned(key) | {"bits": bits, "form": "per-channel sym"} | errors.result()

    def _fc_tensor(self, g: TflGraph, name: str, quant: WeightQuant | None, key: str) -> int:
        ref = self.ckpt[name]
        n, k = shape = ref.shape
        stats = statistics_for(self.statistics, name) if self.statistics is not None and self.searched else None
        grid = SourceGrid.of_ref(ref)
        form = plan_weight(shape, grid, quant, self.recipe.carry_source_blocks, TFLITE_CAPS, stats is not None)
        if form is None:
            return g.weight(key, shape, F32, 4 * n * k, lambda: self._load(name))
        self._plans[key] = form
        if form.block_size:  # INT4 blocks (the planner gives blocks only where TFLite has them)
            return self._blockwise(g, name, form.block_size, key, form.source == "grid")
        # The scales are needed in the flatbuffer (before any buffer is written): computed from row maxima
        # here, and the codes recomputed from the same rows when the buffer is written.
        scale = self._row_scales(name, form.bits)
        q = Quant(scale=scale.tolist(), zero_point=[0] * n, axis=0)

        def produce():
            return self._per_channel(name, form.bits, key, scale)

        if form.bits == 4:
            return g.weight(key, shape, INT4, -(-n * k // 2), produce, q)
        return g.weight(key, shape, np.int8, n * k, produce, q)

    def _planned(self, key: str) -> dict:
        return {"plan": self._plans[key].describe()} if key in self._plans else {}

    def correction(self, name: str) -> int | None:
        """For a weight carried from Q4_K (w = s * (q - zp), zp a float per block of 32): the tensor C [N, K / 32],
        C = s * (8 - zp), such that x @ wᵀ = FC(x, s * (q - 8)) + FC(sum of x over each block, C). The codes
        q - 8 are exactly TFLite's symmetric INT4; the lowering adds the second term."""
        return self._corrections.get(name)

    def _blockwise(
        self, g: TflGraph, name: str, block: int, key: str, carry: bool = False, cols: np.ndarray | None = None,
        searched: bool = False,
    ) -> int:
        """INT4 codes [N, K] and fp16 scales [N, K / block]; both from one read of the weight, at the
        codes' write (the scales' buffer is laid out right after and takes them from `pending`). With
        `carry`, a Q4_K weight's own codes and scales, and its zero-point correction after them. With `cols`,
        those input channels only (a split head's rest), their scales searched with the statistics if `searched`."""
        n, k = self.ckpt[name].shape
        k = k if cols is None else len(cols)
        nb = k // block
        pending: dict[str, np.ndarray] = {}

        stats = statistics_for(self.statistics, name) if self.statistics is not None else None
        if stats is not None and cols is not None:
            stats = stats[cols] if searched else None
        elif cols is None and not self.searched:
            stats = None
        weight = None if stats is None else stats.reshape(nb, block)

        def codes():
            w = self._load(name, cols)
            grid = None
            if carry:
                ref = self.ckpt[name]
                grid = codes_on_grid(w, block_grid(ref.dtype, ref.raw()))
                if grid is not None and (grid[1] < 0).any():
                    grid = None  # a negative scale has no positive-scale INT4 form: re-rounded
            errors = ErrorStats()
            scales, corrections = [], []
            for start in range(0, n, ROWS):
                blocks = w[start : start + ROWS].reshape(-1, nb, block)
                if grid is None:
                    q, scale = quantize_sym4_blocks(blocks, weight)
                    corr = np.zeros(blocks.shape[:2], F32)
                else:
                    codes_, s, zp = (a[start : start + ROWS] for a in grid)
                    q = (codes_.astype(np.int8) - 8).astype(np.int8)
                    scale, corr = s.astype(np.float16), zero_point_correction(s, zp, 4)
                err = q.astype(F32) * scale.astype(F32)[..., None]
                err += corr[..., None]
                err -= blocks
                errors.add(err, blocks)
                scales.append(scale)
                corrections.append(corr)
                yield pack_int4(q)
            self.stats[key] = self._planned(key) | {
                "bits": 4,
                "form": f"blockwise {block} sym, fp16 scales" + (" + Q4_K zero points" if grid is not None else ""),
                "carried_from_source": grid is not None,
                "calibrated": weight is not None and grid is None,
            } | errors.result()
            pending["scale"] = np.concatenate(scales)
            if carry:
                pending["correction"] = np.concatenate(corrections).astype(F32)

        buffer = g.model.weight_buffer(key, -(-n * k // 2), codes)
        scales = g.weight(key + ".scales", [n, nb], np.float16, 2 * n * nb, lambda: pending.pop("scale"))
        self._block_scales[id(g), key] = scales
        if carry:
            self._corrections[name] = g.weight(
                key + ".zero_point_correction", [n, nb], F32, 4 * n * nb, lambda: pending.pop("correction")
            )
        return g.buffer_tensor(buffer, key, [n, k], INT4, Quant(block_scales=scales, block_size=block))

    def _row_scales(self, name: str, bits: int, cols: np.ndarray | None = None) -> np.ndarray:
        key = (name, bits, None if cols is None else cols.tobytes())
        if key not in self._scales:  # a tied table may be an 8-bit lookup and a 4-bit head
            qmax = (1 << (bits - 1)) - 1
            w = self._load(name, cols)
            amax = np.concatenate([np.abs(w[i : i + ROWS]).max(axis=1) for i in range(0, w.shape[0], ROWS)])
            del w
            self._scales[key] = (np.where(amax == 0, 1.0, amax) / qmax).astype(F32)
        return self._scales[key]

    def tensor(self, g: TflGraph, name: str) -> int:
        return self._fc_tensor(g, name, quant_for(self.recipe, "linear", TFLITE_CAPS), name)

    # ---- the embedding lookup and the head ----
    def lookup(self, g: TflGraph, tokens: int) -> int:
        """The embedding rows of `tokens` in float32: GATHER from the table, then its scales."""
        k = self.ckpt[EMBEDDING].shape[1]
        gather = fb.GatherOptionsT()
        gather.axis = 0
        if self._shared() and self._head_form().split is not None:
            return self._lookup_split(g, tokens)
        table = self.embedding(g)
        rows = g.op(Op.GATHER, [table, tokens], (*g.shape(tokens), k), F32, gather)
        return self.dequantize_rows(g, rows, tokens)

    def _head_form(self) -> WeightForm | None:
        name = EMBEDDING if self.cfg.tie_word_embeddings else "lm_head.weight"
        ref = self.ckpt[name]
        grid = SourceGrid.of_ref(ref)
        has = self.statistics is not None and statistics_for(self.statistics, name) is not None
        return plan_weight(ref.shape, grid, self._head_quant(), self.recipe.carry_source_blocks, TFLITE_CAPS, has)

    def _split_head(self, g: TflGraph, name: str, form: WeightForm) -> dict:
        """A head parted by input channel (tensors of this graph, the buffers shared by every graph): the `keep`
        channels of largest mean square input (calibration) in the head's own form, the others in the rest's."""
        cached = self._splits.get((id(g), name))
        if cached is not None:
            return cached
        n, k = self.ckpt[name].shape
        keep = form.split.keep
        ranked = np.argsort(-np.asarray(statistics_for(self.statistics, name), np.float64), kind="stable")
        kept_cols, rest_cols = np.sort(ranked[:keep]), np.sort(ranked[keep:])
        order = np.concatenate([kept_cols, rest_cols])
        key = name + ".head"
        parts = {"order": order, "inverse": np.argsort(order), "keep": keep}
        # the kept channels: 8 bits per output channel (TFLite's only 8-bit form)
        self._plans[key + ".kept"] = dataclasses.replace(form, split=None)
        scale = self._row_scales(name, form.bits, kept_cols)
        q = Quant(scale=scale.tolist(), zero_point=[0] * n, axis=0)
        def kept_codes():
            return self._per_channel(name, form.bits, key + ".kept", scale, kept_cols)

        parts["kept"] = g.weight(key + ".kept", [n, keep], np.int8, n * keep, kept_codes, q)
        parts["kept_scale"] = (key + ".kept", scale)
        rest = form.split.rest
        self._plans[key + ".rest"] = rest
        searched = searches_scales(self.recipe, TFLITE_CAPS)  # the rest's scales searched with the statistics too
        parts["rest"] = self._blockwise(g, name, rest.block_size, key + ".rest", cols=rest_cols, searched=searched)
        parts["rest_form"] = rest
        self._splits[id(g), name] = parts
        return parts

    def _split_matmul(self, g: TflGraph, x: int, parts: dict) -> int:
        """x @ Wᵀ with W parted: x's channels in the parts' order (GATHER on the last axis), sliced, two
        FULLY_CONNECTED and an ADD."""
        lead, k = list(g.shape(x)[:-1]), g.shape(x)[-1]
        gather = fb.GatherOptionsT()
        gather.axis = len(lead)
        ordered = g.op(Op.GATHER, [x, g.const(parts["order"].astype(np.int32))], (*lead, k), F32, gather)
        keep = parts["keep"]
        kept = g.op(Op.SLICE, [ordered, g.const([0] * len(lead) + [0]), g.const(lead + [keep])], (*lead, keep), F32,
                    fb.SliceOptionsT())  # fmt: skip
        rest = g.op(Op.SLICE, [ordered, g.const([0] * len(lead) + [keep]), g.const(lead + [k - keep])],
                    (*lead, k - keep), F32, fb.SliceOptionsT())  # fmt: skip
        options = fb.FullyConnectedOptionsT()
        options.keepNumDims = True
        n = g.shape(parts["kept"])[0]
        a = g.op(Op.FULLY_CONNECTED, [kept, parts["kept"], -1], (*lead, n), F32, options)
        b = g.op(Op.FULLY_CONNECTED, [rest, parts["rest"], -1], (*lead, n), F32, options)
        return g.op(Op.ADD, [a, b], (*lead, n), F32, fb.AddOptionsT())

    def _lookup_split(self, g: TflGraph, tokens: int) -> int:
        """Rows looked up in a split head's two parts (int8 rows times their row scale, INT4 blocks times their
        block scales), joined, and put back in the table's channel order."""
        parts = self._split_head(g, EMBEDDING, self._head_form())
        k = self.ckpt[EMBEDDING].shape[1]
        lead = list(g.shape(tokens))
        gather = fb.GatherOptionsT()
        gather.axis = 0
        keep = parts["keep"]
        kept = g.op(Op.GATHER, [parts["kept"], tokens], (*lead, keep), np.int8, gather)
        kept = self._times_row_scale(g, kept, tokens, *parts["kept_scale"])
        rest = g.op(Op.GATHER, [parts["rest"], tokens], (*lead, k - keep), np.int8, gather)
        scales = self._block_scales[id(g), EMBEDDING + ".head.rest"]
        rest = self._times_block_scales(g, rest, tokens, scales, parts["rest_form"].block_size)
        concat = fb.ConcatenationOptionsT()
        concat.axis = len(lead)
        joined = g.op(Op.CONCATENATION, [kept, rest], (*lead, k), F32, concat)
        back = fb.GatherOptionsT()
        back.axis = len(lead)
        return g.op(Op.GATHER, [joined, g.const(parts["inverse"].astype(np.int32))], (*lead, k), F32, back)

    def _shared(self) -> bool:
        """The lookup reads the tied head's tensor: GATHER takes its INT4 blocks or int8 rows as they are."""
        return self.cfg.tie_word_embeddings and self.recipe.share_tied_table and self._head_quant() is not None

    def _head_quant(self) -> WeightQuant | None:
        return quant_for(self.recipe, "head", TFLITE_CAPS, self.statistics is not None)

    def embedding(self, g: TflGraph) -> int:
        quant = self.recipe.embedding
        shape = self.ckpt[EMBEDDING].shape
        if self._shared():
            return self._fc_tensor(g, EMBEDDING, self._head_quant(), EMBEDDING + ".head")
        if quant is None:
            return g.weight(EMBEDDING, shape, F32, 4 * math.prod(shape), lambda: self._load(EMBEDDING))
        # Rows looked up, then scaled: GATHER returns the int8 rows, CAST and MUL by the gathered row scale.
        if self._carry_q8_0():
            self._plans[EMBEDDING + ".q8_0"] = self.embedding_form()
            return g.weight(EMBEDDING + ".q8_0", shape, np.int8, math.prod(shape), self._q8_0_codes)
        key = EMBEDDING + ".int8"
        self._plans[key] = self.embedding_form()

        def produce():
            return self._per_channel(EMBEDDING, 8, key, self._row_scales(EMBEDDING, 8))

        return g.weight(key, shape, np.int8, math.prod(shape), produce)

    def _carry_q8_0(self) -> bool:
        """A GGUF's Q8_0 embedding kept exactly (the planner's "codes" form): its int8 codes as the table, and its
        per-block scales gathered with the rows (the lookup multiplies each block of 32 by its own scale)."""
        form = self.embedding_form()
        return form is not None and form.source == "codes"

    def embedding_form(self) -> WeightForm | None:
        ref = self.ckpt[EMBEDDING]
        grid = SourceGrid.of(ref.dtype, codes=ref.dtype == "Q8_0" and ref.raw is not None)
        return plan_embedding(ref.shape, grid, self.recipe.embedding, self.recipe.carry_source_blocks, TFLITE_CAPS)

    def _q8_0_codes(self):
        raw = self.ckpt[EMBEDDING].raw()
        for start in range(0, raw.shape[0], ROWS):
            codes, _, _ = block_codes("Q8_0", np.asarray(raw[start : start + ROWS]))
            yield (codes.astype(np.int16) - 128).astype(np.int8)
        key = EMBEDDING + ".q8_0"
        self.stats[key] = {"bits": 8, "form": "Q8_0, blocks of 32 (carried)", "carried_from_source": True,
                           "rel_rms_error": 0.0, "max_abs_error": 0.0} | self._planned(key)  # fmt: skip

    def _q8_0_scales(self) -> np.ndarray:
        raw = self.ckpt[EMBEDDING].raw()
        return np.concatenate(
            [block_grid("Q8_0", np.asarray(raw[i : i + ROWS])).scale for i in range(0, raw.shape[0], ROWS)]
        ).astype(F32)

    def dequantize_rows(self, g: TflGraph, rows: int, tokens: int) -> int:
        """After GATHER: the float rows (a no-op for an fp32 table)."""
        if self._shared():
            return self._dequantize_shared(g, rows, tokens)
        if self.recipe.embedding is None:
            return rows
        if self._carry_q8_0():
            n, k = self.ckpt[EMBEDDING].shape
            scales = g.weight(EMBEDDING + ".q8_0.scales", [n, k // 32], F32, 4 * n * (k // 32), self._q8_0_scales)
            return self._times_block_scales(g, rows, tokens, scales, 32)
        return self._times_row_scale(g, rows, tokens, EMBEDDING, self._row_scales(EMBEDDING, 8))

    def _dequantize_shared(self, g: TflGraph, rows: int, tokens: int) -> int:
        """Rows GATHERed from the head's tensor (int8 codes) times their scales: the row's (per channel) or each
        block's (its blockwise scales)."""
        key = EMBEDDING + ".head"
        form = self._plans[key]
        if not form.block_size:
            return self._times_row_scale(g, rows, tokens, EMBEDDING, self._row_scales(EMBEDDING, form.bits))
        return self._times_block_scales(g, rows, tokens, self._block_scales[id(g), key], form.block_size)

    def _times_row_scale(self, g: TflGraph, rows: int, tokens: int, key: str, scale: np.ndarray) -> int:
        """Integer rows [.., K] looked up from a per-row table, as floats times their row's scale (`key`.scale)."""
        gather = fb.GatherOptionsT()
        gather.axis = 0
        n, lead = len(scale), list(g.shape(tokens))
        scales = g.weight(key + ".scale", [n, 1], F32, 4 * n, lambda: scale[:, None])
        row_scale = g.op(Op.GATHER, [scales, tokens], (*lead, 1), F32, gather)
        as_float = g.op(Op.CAST, [rows], g.shape(rows), F32)
        return g.op(Op.MUL, [as_float, row_scale], g.shape(rows), F32, fb.MulOptionsT())

    def _times_block_scales(self, g: TflGraph, rows: int, tokens: int, scales: int, block: int) -> int:
        """Integer rows [.., K] looked up from a blockwise table, as floats times each block's scale (the scales
        tensor [N, K / block] gathered by the same tokens, cast up if fp16)."""
        gather = fb.GatherOptionsT()
        gather.axis = 0
        lead, k = list(g.shape(tokens)), g.shape(rows)[-1]
        nb = k // block
        block_scale = g.op(Op.GATHER, [scales, tokens], (*lead, nb), g.dtype(scales), gather)
        if g.dtype(scales) != F32:
            block_scale = g.op(Op.CAST, [block_scale], (*lead, nb), F32)
        block_scale = g.reshape(block_scale, [*lead, nb, 1])
        blocks = g.reshape(g.op(Op.CAST, [rows], g.shape(rows), F32), [*lead, nb, block])
        scaled = g.op(Op.MUL, [blocks, block_scale], (*lead, nb, block), F32, fb.MulOptionsT())
        return g.reshape(scaled, [*lead, k])

    def head(self, g: TflGraph, x: int) -> int:
        name = EMBEDDING if self.cfg.tie_word_embeddings else "lm_head.weight"
        form = self._head_form()
        if form is not None and form.split is not None:
            return self._split_matmul(g, x, self._split_head(g, name, form))
        quant = self._head_quant()
        key = name if quant is None else name + ".head"
        w = self._fc_tensor(g, name, quant, key)
        options = fb.FullyConnectedOptionsT()
        options.keepNumDims = True
        return g.op(Op.FULLY_CONNECTED, [x, w, -1], (*g.shape(x)[:-1], g.shape(w)[0]), F32, options)

    def report(self) -> dict:
        """The quantization report: filled as the weights are written (the same dict)."""
        return {"tensors": self.stats}
