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

import math

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from mobilize.compiler.checkpoint import LoadedModel
from mobilize.passes.quant_primitives import error_stats
from mobilize.passes.recipes import Recipe, WeightQuant
from mobilize.targets.tflite_writer import INT4, Quant, TflGraph

Op = fb.BuiltinOperator
F32 = np.float32
EMBEDDING = "model.embed_tokens.weight"


def quantize_per_channel(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (q int8 [N, K] in [-(2**(bits-1) - 1), 2**(bits-1) - 1], scale float32 [N]), symmetric."""
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(w).max(axis=1)
    scale = (np.where(amax == 0, 1.0, amax) / qmax).astype(F32)
    q = np.clip(np.round(w / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] -> bytes, two per byte, the first in the low nibble (TFLite's INT4 layout)."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


class FcWeights:
    def __init__(self, model: LoadedModel, recipe: Recipe) -> None:
        self.cfg, self.ckpt, self.recipe = model.config, model.weights, recipe
        self.stats: dict[str, dict] = {}
        self._scales: dict[str, np.ndarray] = {}

    def _load(self, name: str) -> np.ndarray:
        return np.asarray(self.ckpt[name].load(), dtype=F32)

    def _quantized(self, name: str, quant: WeightQuant, key: str | None = None):
        """(q int8 [N, K], scale [N]) of a weight, with its error statistics recorded."""
        w = self._load(name)
        q, scale = quantize_per_channel(w, quant.bits)
        n = w.shape[0]
        self.stats[key or name] = {
            "bits": quant.bits,
            "form": "per-channel sym",
            **error_stats(
                w, q.reshape(n, 1, -1).astype(np.int16) + 128, scale[:, None], np.full((n, 1), 128, np.uint8)
            ),
        }
        return q, scale

    def _fc_tensor(self, g: TflGraph, name: str, quant: WeightQuant | None, key: str) -> int:
        shape = self.ckpt[name].shape
        n, k = shape
        if quant is None:
            return g.weight(key, shape, F32, 4 * n * k, lambda: self._load(name))
        if quant.bits == 4 and quant.block_size and k % quant.block_size == 0 and k > quant.block_size:
            return self._blockwise(g, name, quant.block_size, key)
        # The scales are needed in the flatbuffer (before any buffer is written): computed from row maxima
        # here, and the codes recomputed from the same rows when the buffer is written.
        scale = self._row_scales(name, quant.bits)
        q = Quant(scale=scale.tolist(), zero_point=[0] * n, axis=0)

        def produce():
            codes, s = self._quantized(name, quant, key)
            if not np.array_equal(s, scale):
                raise AssertionError(f"{name}: scales changed between layout and write")
            return pack_int4(codes) if quant.bits == 4 else codes

        if quant.bits == 4:
            return g.weight(key, shape, INT4, -(-n * k // 2), produce, q)
        return g.weight(key, shape, np.int8, n * k, produce, q)

    def _blockwise(self, g: TflGraph, name: str, block: int, key: str) -> int:
        """INT4 codes [N, K] and fp16 scales [N, K / block]; both from one read of the weight, at the
        codes' write (the scales' buffer is laid out right after and takes them from `pending`)."""
        n, k = self.ckpt[name].shape
        pending: dict[str, np.ndarray] = {}

        def codes():
            w = self._load(name)
            blocks = w.reshape(n, k // block, block)
            amax = np.abs(blocks).max(axis=-1)
            scale = (np.where(amax == 0, 1.0, amax) / 7.0).astype(np.float16)  # fp16 first: codes use it
            q = np.clip(np.round(blocks / scale.astype(F32)[..., None]), -8, 7).astype(np.int8)
            deq = q.astype(F32) * scale.astype(F32)[..., None]
            err = float(np.square(deq - blocks, dtype=np.float64).sum())
            ref = float(np.square(blocks, dtype=np.float64).sum())
            self.stats[key] = {
                "bits": 4,
                "form": f"blockwise {block} sym, fp16 scales",
                "rel_rms_error": (err / max(ref, 1e-30)) ** 0.5,
                "max_abs_error": float(np.abs(deq - blocks).max(initial=0.0)),
            }
            pending["scale"] = scale
            return pack_int4(q)

        scales_shape = [n, k // block]
        buffer = g.model.weight_buffer(key, -(-n * k // 2), codes)
        scales = g.weight(key + ".scales", scales_shape, np.float16, 2 * n * (k // block), lambda: pending.pop("scale"))
        if buffer in g._by_buffer:
            return g._by_buffer[buffer]
        q = Quant(block_scales=scales, block_size=block)
        index = g.tensor(key, [n, k], INT4, buffer, q)
        g._by_buffer[buffer] = index
        return index

    def _row_scales(self, name: str, bits: int) -> np.ndarray:
        if name not in self._scales:
            qmax = (1 << (bits - 1)) - 1
            amax = np.abs(self._load(name)).max(axis=1)
            self._scales[name] = (np.where(amax == 0, 1.0, amax) / qmax).astype(F32)
        return self._scales[name]

    def tensor(self, g: TflGraph, name: str) -> int:
        return self._fc_tensor(g, name, self.recipe.matmul, name)

    # ---- the embedding lookup and the head ----
    def embedding(self, g: TflGraph) -> int:
        quant = self.recipe.embedding
        shape = self.ckpt[EMBEDDING].shape
        if quant is None:
            return g.weight(EMBEDDING, shape, F32, 4 * math.prod(shape), lambda: self._load(EMBEDDING))
        # Rows looked up, then scaled: GATHER returns the int8 rows, CAST and MUL by the gathered row scale.
        key = EMBEDDING + ".int8"

        def produce():
            return self._quantized(EMBEDDING, WeightQuant(8, 0, True), key)[0]

        return g.weight(key, shape, np.int8, math.prod(shape), produce)

    def dequantize_rows(self, g: TflGraph, rows: int, tokens: int) -> int:
        """After GATHER: the float rows (a no-op for an fp32 table)."""
        if self.recipe.embedding is None:
            return rows
        scale = self._row_scales(EMBEDDING, 8)
        scales = g.weight(EMBEDDING + ".scale", [len(scale), 1], F32, 4 * len(scale), lambda: scale[:, None])
        options = fb.GatherOptionsT()
        options.axis = 0
        row_scale = g.op(Op.GATHER, [scales, tokens], (*g.shape(tokens), 1), F32, options)
        as_float = g.op(Op.CAST, [rows], g.shape(rows), F32)
        return g.op(Op.MUL, [as_float, row_scale], g.shape(rows), F32, fb.MulOptionsT())

    def head(self, g: TflGraph, x: int, lowering) -> int:
        name = EMBEDDING if self.cfg.tie_word_embeddings else "lm_head.weight"
        quant = self.recipe.head if self.recipe.head is not None else self.recipe.matmul
        key = name if quant is None else name + ".head"
        w = self._fc_tensor(g, name, quant, key)
        options = fb.FullyConnectedOptionsT()
        options.keepNumDims = True
        return g.op(Op.FULLY_CONNECTED, [x, w, -1], (*g.shape(x)[:-1], g.shape(w)[0]), F32, options)

    def report(self) -> dict:
        return {"tensors": self.stats}
