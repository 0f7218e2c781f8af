"""The quantization grid of a ggml block format: per block, the scale and zero point such that every
stored weight is exactly (q - zero_point) * scale with an integer code q of `bits` bits.

This is what lets a GGUF's already-quantized weights become MatMulNBits weights without re-rounding:
Q4_K maps onto 4-bit blocks of 32 (with float zero points); Q5_0, Q8_0 and Q6_K onto 8-bit blocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

GRID_KINDS = ("Q8_0", "Q5_0", "Q6_K", "Q4_K")
GRID_FORMS = {"Q8_0": (8, 32), "Q5_0": (8, 32), "Q6_K": (8, 16), "Q4_K": (4, 32)}  # (bits, block size)


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    bits: int
    block_size: int
    scale: np.ndarray  # float32 [rows, n_blocks]
    zero_point: np.ndarray  # float32 [rows, n_blocks]; integral except for Q4_K


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def block_grid(kind: str, rows: np.ndarray) -> BlockGrid | None:
    """rows: the raw bytes of a tensor as uint8 [n_rows, bytes_per_row]. None for formats with no exact grid."""
    n = rows.shape[0]
    if kind == "Q8_0":  # 34 bytes: d, 32 x int8
        blocks = rows.reshape(n, -1, 34)
        d = _f16(blocks[..., 0:2])
        return BlockGrid(8, 32, d, np.full_like(d, 128.0))
    if kind == "Q5_0":  # 22 bytes: d, 32 high bits, 16 bytes of low nibbles; w = d * (q - 16)
        blocks = rows.reshape(n, -1, 22)
        d = _f16(blocks[..., 0:2])
        return BlockGrid(8, 32, d, np.full_like(d, 16.0))
    if kind == "Q6_K":  # 210 bytes: ql[128], qh[64], int8 scales[16], d; w = d * sc * (q - 32), sub-blocks of 16
        blocks = rows.reshape(n, -1, 210)
        d = _f16(blocks[..., 208:210])
        sc = blocks[..., 192:208].view(np.int8).astype(np.float32)
        scale = (d[..., None] * sc).reshape(n, -1)
        return BlockGrid(8, 16, scale, np.full_like(scale, 32.0))
    if kind == "Q4_K":  # 144 bytes: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        blocks = rows.reshape(n, -1, 144)
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        packed = blocks[..., 4:16].reshape(n, -1, 3, 4)
        lo, mid, hi = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
        sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)
        mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1).astype(np.float32)
        scale = (d[..., None] * sc).reshape(n, -1)
        offset = (dmin[..., None] * mn).reshape(n, -1)  # w = scale * q - offset
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.where(scale != 0, offset / scale, 0.0).astype(np.float32)
        return BlockGrid(4, 32, scale, zero_point)
    return None


def dequantize_blocks(kind: str, raw: np.ndarray) -> np.ndarray:
    """Q8_0 or Q5_0 bytes -> float32 [n_blocks, 32], one numpy expression for all blocks: Q8_0 w = d * q
    (int8 q); Q5_0 w = d * (q - 16), q's low 4 bits two per byte (the block's first half in the low nibbles)
    and its 5th bits in a little-endian 32-bit word."""
    blocks = raw.reshape(-1, 34 if kind == "Q8_0" else 22)
    d = _f16(blocks[:, 0:2])[:, None]
    if kind == "Q8_0":
        return blocks[:, 2:].view(np.int8) * d
    fifth = ((np.ascontiguousarray(blocks[:, 2:6]).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1) << 4
    packed = blocks[:, 6:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1) | fifth.astype(np.uint8)
    return (q.view(np.int8) - np.int8(16)) * d


def block_codes(kind: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The codes themselves, straight from the bytes, where that is a view: Q8_0 (w = d * q, q int8) as
    (uint8 q + 128 [n, n_blocks, 32], d [n, n_blocks], zero point 128). None for other formats."""
    if kind != "Q8_0":
        return None
    blocks = rows.reshape(rows.shape[0], -1, 34)
    d = _f16(blocks[..., 0:2])
    codes = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q + 128 as uint8: the sign bit flipped, one pass
    return codes, d, np.full(d.shape, 128, dtype=np.uint8)
