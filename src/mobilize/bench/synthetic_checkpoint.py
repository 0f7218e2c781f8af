"""Write a model's shapes to disk as a real sharded Hugging Face checkpoint (config.json, safetensors
shards, model.safetensors.index.json) filled with mobilize's deterministic random weights, streamed one
tensor at a time: for exporting 7B shapes through the normal loader without a download.

    python -m mobilize.bench.synthetic_checkpoint llama-7b OUT_DIR [--shard-gb 5] [--dtype F16]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

DTYPES = {"F16": np.float16, "F32": np.float32}


def write(alias: str, out: Path, shard_bytes: int, dtype: str) -> list[Path]:
    from mobilize.frontend.loader import open_checkpoint

    ckpt = open_checkpoint(alias, random_weights=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(ckpt.hf_config, indent=2) + "\n")
    np_dtype = np.dtype(DTYPES[dtype])
    shards: list[list[str]] = [[]]
    size = 0
    for name, ref in ckpt.tensors.items():
        nbytes = int(np.prod(ref.shape)) * np_dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        file = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            shape = list(ckpt.tensors[name].shape)
            nbytes = int(np.prod(shape)) * np_dtype.itemsize
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file.name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:  # one tensor in memory at a time
                f.write(np.ascontiguousarray(ckpt.tensors[name].load(), dtype=np_dtype).tobytes())
        files.append(file)
    index = {"metadata": {"total_size": sum(f.stat().st_size for f in files)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("alias")
    ap.add_argument("out", type=Path)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="F16")
    args = ap.parse_args(argv)
    files = write(args.alias, args.out, int(args.shard_gb * 1e9), args.dtype)
    print(f"wrote {len(files)} shards, {sum(f.stat().st_size for f in files) / 1e9:.2f} GB, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
