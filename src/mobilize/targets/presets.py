"""Platform presets: what `--target` picks when a flag does not say otherwise. Plain data."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    format: str
    quant: str
    max_seq_len: int
    threads: int | None  # intra-op threads the package asks for: the device's big cores (None: this machine's)
    device: str | None = None  # the device profile of the fit check


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # A decode step is bound by memory bandwidth: the big cores saturate it, and a little core in the pool
        # would make every step wait for its share (Pixel 6: 2x Cortex-X1; A16: 2 performance cores)
        Preset("android", "phones such as the Pixel 6 (8 GB, 2 big cores)", "onnx", "int4", 2048, 2, "pixel6"),
        Preset("ios", "iPhones (6-8 GB)", "onnx", "int4", 2048, 2, "iphone15"),
        Preset("host", "this machine: desktop and CI", "onnx", "int8", 4096, None),
    ]
}
