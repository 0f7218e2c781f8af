"""`mobilize fit`: will a package fit a device's memory, and how fast can it decode there at best?

Memory: the weights file (memory-mapped, all of it resident when used), the KV cache at its full length,
the largest activations (the logits of a prompt), and a fixed runtime allowance. Decode roofline: every
token reads every weight once (an embedding table only one row) and, at full context, the whole KV cache;
tokens/s <= bandwidth / those bytes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError
from mobilize.targets.devices import DEVICES
from mobilize.targets.registry import TARGETS

RUNTIME_BYTES = 64 << 20  # ONNX Runtime's own code and arenas, an allowance
_DTYPE_BYTES = {"FLOAT": 4, "FLOAT16": 2, "BFLOAT16": 2, "INT64": 8, "INT32": 4}


def fit(package_dir: Path, manifest: dict[str, Any], device: str, prompt_len: int = 128) -> dict[str, Any]:
    if device not in DEVICES:
        raise MobilizeError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    dev = DEVICES[device]
    target = TARGETS.get(manifest.get("format"))
    if target is None:
        raise MobilizeError(f"unknown package format {manifest.get('format')!r} (known: {', '.join(TARGETS)})")
    weights, per_token = target.weight_bytes(package_dir)
    kv = 0
    for value in manifest["io"]["inputs"]:
        if value["name"].startswith(("past_key_values.", "kv_cache_")):
            dims = [
                manifest["target"]["max_seq_len"] if isinstance(d, str) and d != "batch" else d for d in value["shape"]
            ]
            dims = [1 if d == "batch" else d for d in dims]
            kv += math.prod(dims) * _DTYPE_BYTES.get(value["dtype"], 4)
    activations = target.activation_bytes(manifest, prompt_len)
    need = weights + kv + activations + RUNTIME_BYTES
    budget = dev.ram_gb * 1e9 * dev.app_fraction
    read = per_token + kv
    return {
        "device": dev.name,
        "soc": dev.soc,
        "memory": {
            "weights_bytes": weights,
            "kv_cache_bytes": kv,
            "activation_bytes": activations,
            "runtime_bytes": RUNTIME_BYTES,
            "total_bytes": need,
            "budget_bytes": int(budget),
            "fits": need <= budget,
        },
        "decode_roofline": {
            "weight_bytes_per_token": per_token,
            "kv_bytes_per_token_at_full_context": kv,
            "bandwidth_gb_s": dev.bandwidth_gb_s,
            "tokens_per_s_at_most": dev.bandwidth_gb_s * 1e9 / read,
        },
    }
