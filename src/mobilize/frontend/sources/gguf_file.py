"""A strict GGUF (v2/v3) reader: metadata, tensor table, and dequantization on demand.

The header and tensor table are parsed by hand so that every count, length, dimension and offset
is checked against the file's size *before* anything is allocated. Dequantization of block formats
uses the `gguf` package's numpy kernels (the reference implementation of llama.cpp's formats).
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from mobilize.errors import CheckpointError
from mobilize.frontend.sources.base import TensorRef

GGUF_MAGIC = b"GGUF"
_MAX_DIMS = 4
_MAX_STRING = 1 << 24  # 16 MiB: no key or chat template is longer
_MAX_ITEMS = 1 << 22  # array items in all the metadata: a 262k vocabulary with merges has ~1M
_MAX_TOKEN_BYTES = 1024  # one vocabulary entry (the longest in real vocabularies are ~100); converters are O(n^2)
_MAX_VOCAB_WORK = 1 << 32  # the sum of squared entry lengths (Gemma 3's 262k entries: 3.6e7)
# Keys whose type the readers rely on: (kind, what it must be)
_TYPED_KEYS = {
    "general.architecture": str,
    "tokenizer.ggml.model": str,
    "tokenizer.ggml.pre": str,
    "tokenizer.ggml.tokens": (list, str),
    "tokenizer.ggml.merges": (list, str),
    "tokenizer.ggml.scores": (list, float),
    "tokenizer.ggml.token_type": (list, int),
    "tokenizer.ggml.bos_token_id": int,
    "tokenizer.ggml.eos_token_id": int,
    "tokenizer.ggml.padding_token_id": int,
    "tokenizer.ggml.unknown_token_id": int,
    "tokenizer.ggml.add_bos_token": bool,
    "tokenizer.ggml.add_eos_token": bool,
    "tokenizer.chat_template": str,
    "general.alignment": int,
}

# value type id -> (struct format, size) for scalars
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9

# The ggml tensor types we read: name, elements per block, bytes per block.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}


class _Cursor:
    def __init__(self, buf: memoryview, name: str) -> None:
        self.buf, self.pos, self.name = buf, 0, name
        self.items = 0  # array items read so far

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.name}: GGUF header runs past the end of the file at byte {self.pos} (wants {n} more)"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, type_id: int) -> Any:
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.take(size))[0]

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise CheckpointError(f"{self.name}: GGUF string of {n} bytes at byte {self.pos} is absurd")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.name}: GGUF string at byte {self.pos} is not UTF-8") from None

    def value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self.scalar(type_id)
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.u32(), self.u64()
            remaining = len(self.buf) - self.pos
            item_bytes = _SCALARS[item_type][1] if item_type in _SCALARS else 8  # a string: its length at least
            if count * item_bytes > remaining:
                raise CheckpointError(f"{self.name}: GGUF array of {count} items cannot fit in the file")
            if item_type == _ARRAY:
                raise CheckpointError(f"{self.name}: GGUF array of arrays at byte {self.pos} (llama.cpp has none)")
            self.items += count
            if self.items > _MAX_ITEMS:  # a Python list holds ~9x an array's bytes: bounded before it is built
                raise CheckpointError(f"{self.name}: GGUF metadata holds more than {_MAX_ITEMS:,} array items")
            if item_type in _SCALARS:  # numeric arrays in one read
                fmt, size = _SCALARS[item_type]
                raw = self.take(size * count)
                return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
            return [self.value(item_type) for _ in range(count)]
        raise CheckpointError(f"{self.name}: unknown GGUF value type {type_id} at byte {self.pos}")


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, TensorRef]]:
    """Parse a GGUF file. Returns (metadata, tensors) with tensors in numpy (row-major) order."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise CheckpointError(f"{name}: not a GGUF file (the first bytes are not 'GGUF')")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read: {e.strerror}") from None
    cur = _Cursor(memoryview(mm), name)
    cur.take(4)
    version = cur.u32()
    if version not in (2, 3):
        raise CheckpointError(f"{name}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_tensors > size // 24 or n_kv > size // 12:
        raise CheckpointError(f"{name}: GGUF claims {n_tensors} tensors and {n_kv} keys, more than fit in {size} bytes")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in metadata:  # as llama.cpp refuses them: which one would a reader take?
            raise CheckpointError(f"{name}: GGUF key {key[:80]!r} appears twice")
        metadata[key] = cur.value(cur.u32())
    _check_types(metadata, name)

    infos = []
    for _ in range(n_tensors):
        tname = cur.string()
        n_dims = cur.u32()
        if not 1 <= n_dims <= _MAX_DIMS:
            raise CheckpointError(f"{name}: tensor {tname!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = [cur.u64() for _ in range(n_dims)]
        type_id, offset = cur.u32(), cur.u64()
        infos.append((tname, dims, type_id, offset))
    if len({t[0] for t in infos}) != len(infos):
        seen: set[str] = set()
        twice = next(t[0] for t in infos if t[0] in seen or seen.add(t[0]))
        raise CheckpointError(f"{name}: GGUF tensor {twice[:80]!r} appears twice")

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{name}: general.alignment {alignment!r} is not a power of two")
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    data_size = size - data_start

    tensors: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    for tname, dims, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            raise CheckpointError(f"{name}: tensor {tname!r} has ggml type {type_id}, which mobilize cannot read")
        tname_type, block, block_bytes = GGML_TYPES[type_id]
        n = 1
        for d in dims:
            n *= d
            if d == 0 or n > data_size * 8:  # cannot be stored in this file at any bit width
                raise CheckpointError(f"{name}: tensor {tname!r} has dims {dims}, more elements than the file can hold")
        if dims[0] % block:
            raise CheckpointError(
                f"{name}: tensor {tname!r} row of {dims[0]} is not a multiple of {tname_type} blocks ({block})"
            )
        nbytes = n // block * block_bytes
        if offset % alignment or offset + nbytes > data_size:
            raise CheckpointError(
                f"{name}: tensor {tname!r} at offset {offset} ({nbytes} bytes) runs past the data section "
                f"({data_size} bytes) or is unaligned; the file is truncated or its table lies"
            )
        spans.append((offset, offset + nbytes, tname))
        shape = tuple(reversed(dims))  # ggml lists the fastest dimension first
        start = data_start + offset
        tensors[tname] = TensorRef(
            tname,
            shape,
            tname_type,
            nbytes,
            _loader(mm, start, nbytes, type_id, shape),
            raw=_raw(mm, start, nbytes, shape, tname_type, block_bytes, f"{name}: tensor {tname[:80]!r}"),
        )
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{name}: GGUF tensors {a[:80]!r} and {b[:80]!r} share bytes (their data overlap)")
    return metadata, tensors


def _is(x: Any, kind: type) -> bool:
    if kind is int:
        return type(x) is int
    if kind is float:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    return isinstance(x, kind)


def _check_types(meta: dict[str, Any], name: str) -> None:
    for key, kind in _TYPED_KEYS.items():
        if key not in meta:
            continue
        v = meta[key]
        if isinstance(kind, tuple):
            ok = isinstance(v, list) and all(_is(x, kind[1]) for x in v)
        else:
            ok = _is(v, kind)
        if not ok:
            what = f"an array of {kind[1].__name__}" if isinstance(kind, tuple) else f"a {kind.__name__}"
            raise CheckpointError(f"{name}: GGUF key {key} is {repr(v)[:40]}, not {what}")
    lengths = [len(t.encode()) for t in meta.get("tokenizer.ggml.tokens") or []]
    if lengths and max(lengths) > _MAX_TOKEN_BYTES:
        raise CheckpointError(
            f"{name}: a vocabulary entry of {max(lengths):,} bytes (more than {_MAX_TOKEN_BYTES}) is no token"
        )
    if sum(n * n for n in lengths) > _MAX_VOCAB_WORK:  # what a conversion quadratic in token length would do
        raise CheckpointError(f"{name}: the vocabulary's {len(lengths):,} entries are too long to be a tokenizer's")


# Where each block format keeps its float16 scales (byte offsets in a block): checked when blocks are carried over
# as they are, since their values are then never decoded (a NaN scale would make its rows NaN on the device).
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                  "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # fmt: skip


def _raw(mm, offset: int, nbytes: int, shape: tuple[int, ...], kind: str, block_bytes: int, what: str):
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    checked = kind not in _SCALE_OFFSETS

    def raw() -> np.ndarray:
        nonlocal checked
        blocks = mm[offset : offset + nbytes].reshape(rows, nbytes // rows)
        if not checked:  # once per tensor: a tied head reads its blocks again a chunk at a time
            per_block = blocks.reshape(-1, block_bytes)
            for at in _SCALE_OFFSETS[kind]:
                if not np.isfinite(per_block[:, at : at + 2].copy().view(np.float16)).all():
                    raise CheckpointError(f"{what} has NaN or infinite block scales")
            checked = True
        return blocks

    return raw


def _loader(mm, offset: int, nbytes: int, type_id: int, shape: tuple[int, ...]):
    def load() -> np.ndarray:
        raw = mm[offset : offset + nbytes]
        kind = GGML_TYPES[type_id][0]
        if kind == "F32":
            return raw.view(np.float32).reshape(shape)
        if kind == "F16":
            return raw.view(np.float16).reshape(shape).astype(np.float32)
        if kind == "BF16":
            from mobilize.frontend.sources.safetensors_file import bf16_to_f32

            return bf16_to_f32(raw.view(np.uint16)).reshape(shape)
        if kind in ("Q8_0", "Q5_0"):  # vectorized over all blocks at once (gguf's loop over rows: 3-4x slower)
            from mobilize.frontend.sources.gguf_grid import dequantize_blocks

            return dequantize_blocks(kind, raw).reshape(shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = raw.reshape(-1, nbytes // int(np.prod(shape[:-1], dtype=np.int64)))
        return dequantize(rows, GGMLQuantizationType(type_id)).reshape(shape).astype(np.float32, copy=False)

    return load
