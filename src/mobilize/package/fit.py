"""`mobilize fit`: will a package fit a device's memory, and how fast can it decode there?

Memory, counted as Android counts it (targets/devices.py). The weights file is memory-mapped (file-backed pages), but
both runtimes repack every matrix a decode step multiplies by into buffers of their own at load (ONNX Runtime's
MatMulNBits prepacking, XNNPACK's packed weights): those bytes are anonymous memory, resident for the session. An
embedding table is only looked up, a row per token, straight from the mapped file: file-backed pages the kernel
reclaims when it needs them and reads back when a row is needed, so they are not counted against the budget
(on this machine, a loaded Gemma 3 270M package held its 194 MB table with 0 kB resident). The KV cache at its
full length, the largest activations and a fixed runtime allowance are anonymous too. The package fits when its
anonymous memory stays under what the device lets one app keep resident.

Decode: every token reads every weight once (an embedding table only one row) and, at full context, the whole KV
cache (plus what the runtime copies of it); tokens/s is the bandwidth a phone reaches (a range of the peak) over
those bytes.

`predict` is the same model on numbers instead of a package: the presets plan with it before writing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError
from mobilize.manifest import Manifest
from mobilize.targets.devices import DEVICES, Device
from mobilize.targets.registry import runtime, target

RUNTIME_BYTES = 64 << 20  # the runtime's own code and arenas, an allowance
_DTYPE_BYTES = {"FLOAT": 4, "FLOAT16": 2, "BFLOAT16": 2, "INT64": 8, "INT32": 4}


def device_named(device: str) -> Device:
    if device not in DEVICES:
        raise MobilizeError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    return DEVICES[device]


def predict(dev: Device, weights: int, per_token: int, kv: int, kv_read: int, activations: int) -> dict[str, Any]:
    """The fit of a package with these bytes: `per_token` the weights a decode step reads (every matrix: the repacked,
    anonymous part), `kv_read` what it reads of the cache at full context."""
    packed = min(per_token, weights)
    anonymous = packed + kv + activations + RUNTIME_BYTES
    need = anonymous
    budget = int(dev.resident_gb * 1e9)
    read = per_token + kv_read
    lo, hi = dev.bandwidth_fraction
    peak = dev.bandwidth_gb_s * 1e9 / read
    return {
        "device": dev.name,
        "soc": dev.soc,
        "memory": {
            "weights_bytes": weights,  # the files'
            "weights_repacked_bytes": packed,  # anonymous: the matrices, repacked by the runtime at load
            "weights_file_backed_bytes": weights - packed,  # lookup tables, read from the mapped file
            "kv_cache_bytes": kv,
            "activation_bytes": activations,
            "runtime_bytes": RUNTIME_BYTES,
            "anonymous_bytes": anonymous,
            "total_bytes": need,
            "budget_bytes": budget,
            "fits": need <= budget,
        },
        "decode_roofline": {
            "weight_bytes_per_token": per_token,
            "kv_bytes_per_token_at_full_context": kv_read,
            "bandwidth_gb_s": dev.bandwidth_gb_s,
            "bandwidth_fraction": [lo, hi],
            "tokens_per_s": [lo * peak, hi * peak],
            "tokens_per_s_at_most": peak,
        },
    }


def kv_bytes(manifest: Manifest) -> int:
    """The KV cache's buffers at full length (a growing cache counted at the package's max_seq_len)."""
    kv = 0
    prefix = runtime(manifest.format).CACHE_INPUTS
    for value in manifest.io.inputs:
        if value.name.startswith(prefix):
            dims = [manifest.target.max_seq_len if isinstance(d, str) and d != "batch" else d for d in value.shape]
            dims = [1 if d == "batch" else d for d in dims]
            kv += math.prod(dims) * _DTYPE_BYTES.get(value.dtype, 4)
    return kv


def fit(package_dir: Path, manifest: Manifest, device: str, prompt_len: int = 128) -> dict[str, Any]:
    dev = device_named(device)
    t = target(manifest.format)
    weights, per_token = t.weight_bytes(package_dir)
    kv = kv_bytes(manifest)
    activations = t.activation_bytes(manifest.architecture, manifest.target, manifest.kv_cache.dtype, prompt_len)
    return predict(dev, weights, per_token, kv, t.kv_read_bytes(kv, manifest.kv_cache.dtype), activations)


def describe(r: dict[str, Any]) -> str:
    """One line: the verdict and the decode range (export's and the plans' wording)."""
    m, d = r["memory"], r["decode_roofline"]
    lo, hi = d["tokens_per_s"]
    verdict = "fits" if m["fits"] else "does not fit"
    return (
        f"{m['total_bytes'] / 1e9:.2f} GB resident ({m['weights_repacked_bytes'] / 1e9:.2f} GB weights + "
        f"{(m['total_bytes'] - m['weights_repacked_bytes']) / 1e9:.2f} GB KV cache and buffers) of the "
        f"{m['budget_bytes'] / 1e9:.2f} GB a {r['device']} app can keep: {verdict}; decode {lo:.1f}-{hi:.1f} tok/s "
        "at full context"
    )
