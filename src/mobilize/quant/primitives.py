"""Quantization primitives: pure numpy functions, each with its inverse beside it.

Layout follows ONNX Runtime's `com.microsoft::MatMulNBits`: a weight is seen as [N, K] (output rows,
input columns), cut along K into blocks of `block_size`; each block has one scale and, when asymmetric,
one zero point: w ~= (q - zero_point) * scale, q in [0, 2**bits - 1].
"""

from __future__ import annotations

import numpy as np

ROWS = 1024  # rows per chunk: a few MB of temporaries (cache-sized: faster than 8192 rows), whatever the matrix


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K] float -> (q uint8 [N, n_blocks, block_size], scale float32 [N, n_blocks],
    zero_point uint8 [N, n_blocks]). K is zero-padded up to a whole number of blocks. Rounds to nearest
    over the block's range, or with `importance` (each input channel's mean square activation [K]) by
    `search_blocks`."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: only 4 and 8 are supported")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two >= 16")
    n, k = w.shape
    n_blocks = -(-k // block_size)
    q = np.empty((n, n_blocks, block_size), np.uint8)
    scale = np.empty((n, n_blocks), np.float32)
    zero_point = np.empty((n, n_blocks), np.uint8)
    weight = None
    if importance is not None:
        weight = np.zeros(n_blocks * block_size, np.float32)
        weight[:k] = importance
        weight = weight.reshape(n_blocks, block_size)
    for start in range(0, n, ROWS):
        rows = slice(start, start + ROWS)
        if weight is None:
            q[rows], scale[rows], zero_point[rows] = _quantize_rows(w[rows], bits, block_size, symmetric)
        else:
            q[rows], scale[rows], zero_point[rows] = search_blocks(
                _blocks(w[rows], block_size), bits, symmetric, weight
            )
    return q, scale, zero_point


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    return padded.reshape(n, n_blocks, block_size)


def _quantize_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    blocks = _blocks(w, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        # The largest magnitude maps to -2**(bits-1), the most negative code, as ORT's quantizer does:
        # one more step of range than mapping it to +2**(bits-1)-1.
        mid = 1 << (bits - 1)
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        scale = (extreme / -mid).astype(np.float32)
        zero_point = np.full(scale.shape, mid, dtype=np.uint8)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = ((hi - lo) / qmax).astype(np.float32)
        safe = np.where(scale == 0, 1.0, scale)
        zero_point = np.clip(np.round(-lo / safe), 0, qmax).astype(np.uint8)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    q = np.clip(np.round(blocks / safe) + zero_point[..., None], 0, qmax).astype(np.uint8)
    return q, scale, zero_point


CLIP_RATIOS = (1.0, 0.9, 0.8)


def search_blocks(
    blocks: np.ndarray,
    bits: int,
    symmetric: bool,
    weight: np.ndarray | None = None,
    scale_dtype=np.float32,
    ratios: tuple[float, ...] = CLIP_RATIOS,
    polish: int = 1,
    negative_scales: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation-aware rounding: blocks [N, n_blocks, block] -> (codes uint8, scale [N, n_blocks] in
    `scale_dtype`, zero_point uint8), w ~= (code - zero_point) * scale.

    Per block, the scale of least error E = sum_j h_j (w_j - dequantized_j)**2, where h [n_blocks, block]
    (`weight`) is each input channel's mean square activation on calibration text (None: equal weights).
    Each candidate scale (the block's range clipped by each of `ratios`) rounds the block once; the codes it
    gives then fix the weighted least-squares scale s* = sum(h c w) / sum(h c c), and the error of those
    codes at s* bounds the error after rounding again at s* (which can only lower it). The block keeps the
    s* with the least bound; `polish` more rounds start from it. Symmetric blocks keep the zero point at
    2**(bits-1), the form ONNX Runtime's and XNNPACK's fast kernels want; asymmetric ones shrink both ends of
    the range alike. A negative scale puts a positive extreme on the most negative code; XNNPACK takes only
    positive scales (`negative_scales`)."""
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    h = np.ones(blocks.shape[1:], np.float32) if weight is None else np.asarray(weight, np.float32)
    h = h / max(float(h.mean()), 1e-30)  # only the relative weights matter; keeps the sums in range
    hw = blocks * h
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        zp = np.full(blocks.shape[:-1], mid, np.float32)
        # the largest magnitude on the most negative code, or on the most positive one
        candidates = [
            (s * r, zp)
            for s in (extreme / -mid if negative_scales else np.abs(extreme) / mid, np.abs(extreme) / (mid - 1))
            for r in ratios
        ]
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        candidates = []
        for r in ratios:
            s = (hi - lo) * (r / qmax)
            candidates.append((s, np.clip(np.round(-lo * r / np.where(s == 0, 1.0, s)), 0, qmax)))
    best_bound = best_scale = best_zp = None
    for i in range(len(candidates) + polish):
        # after the candidates, `polish` more rounds from the best scale so far (a Lloyd iteration)
        scale, zero_point = candidates[i] if i < len(candidates) else (best_scale, best_zp)
        c = _codes(blocks, scale.astype(scale_dtype).astype(np.float32), zero_point, qmax)
        num = np.einsum("nbk,nbk->nb", hw, c)
        den = np.einsum("nbk,nbk,bk->nb", c, c, h)
        fitted = den > 0
        refit = np.where(fitted, num / np.where(fitted, den, 1.0), 0.0)
        # the error of these codes at s* (computed directly: sum(h w w) - num * s* cancels at 8 bits)
        err = c * refit[..., None]
        err -= blocks
        bound = np.einsum("nbk,nbk,bk->nb", err, err, h)
        if best_bound is None:
            best_bound, best_scale, best_zp = bound, refit, zero_point
        else:
            better = bound < best_bound
            best_bound = np.where(better, bound, best_bound)
            best_scale = np.where(better, refit, best_scale)
            best_zp = np.where(better, zero_point, best_zp)
    scale = best_scale.astype(scale_dtype)
    q = _codes(blocks, scale.astype(np.float32), best_zp, qmax) + best_zp[..., None]
    return q.astype(np.uint8), scale, best_zp.astype(np.uint8)


def _codes(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmax: int) -> np.ndarray:
    """round(w / scale) within the code range, less the zero point (float32; 0 where the scale is 0)."""
    c = blocks / np.where(scale == 0, np.inf, scale)[..., None]
    np.rint(c, out=c)
    z = zero_point[..., None]
    return np.clip(c, -z, qmax - z, out=c)


def dequantize_blockwise(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, k: int) -> np.ndarray:
    """The inverse: (q [N, n_blocks, block], scale, zero_point) -> w [N, K] float32."""
    w = q.astype(np.float32)  # (in place from here: a 2048 x 8192 weight is 64 MB per temporary)
    w -= zero_point[..., None].astype(np.float32)
    w *= scale[..., None]
    return w.reshape(q.shape[0], -1)[:, :k]


class ErrorStats:
    """Relative RMS and max absolute error, gathered a chunk at a time. Float32 dot products (BLAS, no float64
    copies): a statistic, good to ~1e-6 relative, and a quarter of a large export's time when it squared in
    float64."""

    def __init__(self) -> None:
        self.sq_err = self.sq_ref = self.max_abs = 0.0

    def add(self, err: np.ndarray, ref: np.ndarray) -> None:
        e, r = np.ravel(err).astype(np.float32, copy=False), np.ravel(ref).astype(np.float32, copy=False)
        if e.size:
            self.sq_err += float(np.dot(e, e))
            self.sq_ref += float(np.dot(r, r))
            self.max_abs = max(self.max_abs, float(e.max()), -float(e.min()))

    def result(self) -> dict[str, float]:
        return {"rel_rms_error": (self.sq_err / max(self.sq_ref, 1e-30)) ** 0.5, "max_abs_error": self.max_abs}


def error_stats(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> dict[str, float]:
    """Relative RMS and max absolute error of the quantized form against w [N, K], a chunk of rows at a time."""
    k, stats = w.shape[1], ErrorStats()
    for start in range(0, w.shape[0], ROWS):
        rows = slice(start, start + ROWS)
        chunk = w[rows].astype(np.float32, copy=False)
        err = dequantize_blockwise(q[rows], scale[rows], zero_point[rows], k)
        err -= chunk
        stats.add(err, chunk)
    return stats.result()


def pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis: for 4 bits two per byte, the first in the low nibble."""
    if bits == 8:
        return np.asarray(q, dtype=np.uint8)  # no copy of codes that are uint8 already
    lo, hi = q[..., 0::2], q[..., 1::2]
    return (lo | (hi << 4)).astype(np.uint8)


def unpack_nbits(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_zero_points(zero_point: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' zero-point input: per row, n_blocks codes packed, rows padded to whole bytes."""
    if bits == 8:
        return zero_point.reshape(-1).astype(np.uint8)
    n, n_blocks = zero_point.shape
    padded = np.zeros((n, n_blocks + (n_blocks & 1)), dtype=np.uint8)
    padded[:, :n_blocks] = zero_point
    return pack_nbits(padded, 4).reshape(-1)


def zero_point_correction(scale: np.ndarray, zero_point: np.ndarray, bits: int) -> np.ndarray:
    """Float zero points on a symmetric kernel: w = s(q - zp) = s(q - z0) + s(z0 - zp) with z0 = 2**(bits-1),
    so a kernel with the default zero point plus sum(x over each block) @ s(z0 - zp) is exact. Returns
    s(z0 - zp) [N, n_blocks], float32."""
    return (scale * (np.float32(1 << (bits - 1)) - zero_point.astype(np.float32))).astype(np.float32)


def codes_on_grid(w_nk: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
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
