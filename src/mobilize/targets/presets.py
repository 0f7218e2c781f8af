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
    threads: int  # what the harness uses on the device
    device: str | None = None  # the device profile of the fit check


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("android", "phones such as the Pixel 6 (8 GB, 2 big cores)", "onnx", "int4", 2048, 4, "pixel6"),
        Preset("ios", "iPhones (6-8 GB)", "onnx", "int4", 2048, 4, "iphone15"),
        Preset("host", "this machine: desktop and CI", "onnx", "int8", 4096, 0),
    ]
}
