"""A strict, memory-mapped reader of the safetensors format.

The header is validated before any tensor is touched: its length, its JSON, every dtype, and every
tensor's offsets (inside the data section, matching shape x itemsize, not overlapping). Tensors are
views into a read-only memory map, so a 14 GB checkpoint costs nothing until a tensor is read.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from mobilize.errors import CheckpointError
from mobilize.frontend.sources.base import TensorRef
from mobilize.safe_io import DuplicateKey, unique_keys

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit

_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # widened to float32 on load
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str) -> dict[str, TensorRef]:
    """Parse and validate one .safetensors file; return lazy references to its tensors."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{name}: header claims {header_len} bytes but the file has {size}; truncated or not safetensors"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw, object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{name}: header is not valid JSON ({e})") from None
    except DuplicateKey as e:
        raise CheckpointError(f"{name}: tensor or field {str(e.args[0])[:80]!r} appears twice in the header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_size = size - data_start
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None

    refs: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    for tname, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{name}: tensor {tname!r} lacks dtype/shape/data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{name}: tensor {tname!r} has unknown dtype {dtype_name!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**40 for d in shape)):
            raise CheckpointError(f"{name}: tensor {tname!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{name}: tensor {tname!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        np_dtype, itemsize = _DTYPES[dtype_name]
        n = int(np.prod(shape, dtype=object)) if shape else 1
        if not 0 <= begin <= end or end > data_size:
            raise CheckpointError(
                f"{name}: tensor {tname!r} spans bytes {begin}..{end} but the data section has {data_size}; "
                "the file is truncated or its header lies"
            )
        if end - begin != n * itemsize:
            raise CheckpointError(
                f"{name}: tensor {tname!r} has shape {shape} {dtype_name} ({n * itemsize} bytes) "
                f"but its offsets hold {end - begin} bytes"
            )
        spans.append((begin, end, tname))
        refs[tname] = TensorRef(
            name=tname,
            shape=tuple(shape),
            dtype=dtype_name,
            nbytes=end - begin,
            load=_loader(mm, data_start + begin, n, np_dtype, tuple(shape), dtype_name),
        )
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CheckpointError(f"{name}: tensors {n0!r} and {n1!r} overlap in the file")
    return refs


def _loader(mm, offset: int, count: int, dtype: np.dtype, shape: tuple[int, ...], dtype_name: str):
    def load() -> np.ndarray:
        arr = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
        if dtype_name == "BF16":
            out = bf16_to_f32(arr)
        elif dtype_name in ("F16", "F64"):
            out = arr.astype(np.float32)
        else:
            out = np.array(arr)  # a copy, so the mapped pages can be let go now
        del arr
        _release(mm, offset, count * dtype.itemsize)
        return out

    return load


def _release(mm, offset: int, nbytes: int) -> None:
    """Drop the tensor's pages from this process (they stay in the page cache): a checkpoint read through
    one mapping would otherwise count, page by page, in the export's resident memory until it ends."""
    raw = getattr(mm, "_mmap", None)
    if raw is None or not hasattr(raw, "madvise"):
        return
    page = mmap.PAGESIZE
    start = offset // page * page
    try:
        raw.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
    except (OSError, ValueError):
        pass
