"""Quantization primitives: pure numpy functions, each with its inverse beside it.

Layout follows ONNX Runtime's `com.microsoft::MatMulNBits`: a weight is seen as [N, K] (output rows,
input columns), cut along K into blocks of `block_size`; each block has one scale and, when asymmetric,
one zero point: w ~= (q - zero_point) * scale, q in [0, 2**bits - 1].
"""

from __future__ import annotations

import numpy as np

ROWS = 8192  # rows per chunk: temporaries stay a few MB whatever the matrix (a 262144-row head included)


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K] float -> (q uint8 [N, n_blocks, block_size], scale float32 [N, n_blocks],
    zero_point uint8 [N, n_blocks]). K is zero-padded up to a whole number of blocks."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: only 4 and 8 are supported")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two >= 16")
    n, k = w.shape
    n_blocks = -(-k // block_size)
    q = np.empty((n, n_blocks, block_size), np.uint8)
    scale = np.empty((n, n_blocks), np.float32)
    zero_point = np.empty((n, n_blocks), np.uint8)
    for start in range(0, n, ROWS):
        rows = slice(start, start + ROWS)
        q[rows], scale[rows], zero_point[rows] = _quantize_rows(w[rows], bits, block_size, symmetric)
    return q, scale, zero_point


def _quantize_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block_size)
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


def dequantize_blockwise(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, k: int) -> np.ndarray:
    """The inverse: (q [N, n_blocks, block], scale, zero_point) -> w [N, K] float32."""
    w = (q.astype(np.float32) - zero_point[..., None].astype(np.float32)) * scale[..., None]
    return w.reshape(q.shape[0], -1)[:, :k]


def error_stats(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> dict[str, float]:
    """Relative RMS and max absolute error of the quantized form against w [N, K], a chunk of rows at a time."""
    k = w.shape[1]
    sq_err = sq_w = 0.0
    max_abs = 0.0
    for start in range(0, w.shape[0], ROWS):
        rows = slice(start, start + ROWS)
        chunk = w[rows].astype(np.float32, copy=False)
        err = dequantize_blockwise(q[rows], scale[rows], zero_point[rows], k) - chunk
        sq_err += float(np.square(err, dtype=np.float64).sum())
        sq_w += float(np.square(chunk, dtype=np.float64).sum())
        max_abs = max(max_abs, float(np.abs(err).max(initial=0.0)))
    return {"rel_rms_error": (sq_err / max(sq_w, 1e-30)) ** 0.5, "max_abs_error": max_abs}


def pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis: for 4 bits two per byte, the first in the low nibble."""
    if bits == 8:
        return q.astype(np.uint8)
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
