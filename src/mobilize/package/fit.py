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

RUNTIME_BYTES = 64 << 20  # ONNX Runtime's own code and arenas, an allowance
_DTYPE_BYTES = {"FLOAT": 4, "FLOAT16": 2, "BFLOAT16": 2, "INT64": 8, "INT32": 4}


def fit(package_dir: Path, manifest: dict[str, Any], device: str, prompt_len: int = 128) -> dict[str, Any]:
    if device not in DEVICES:
        raise MobilizeError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    dev = DEVICES[device]
    if manifest.get("format") == "tflite":
        from mobilize.targets.tflite.writer import weight_bytes

        weights, per_token = weight_bytes(package_dir / "model.tflite")
    else:
        weights, per_token = _weight_bytes(package_dir / "model.onnx")
    kv = 0
    for value in manifest["io"]["inputs"]:
        if value["name"].startswith(("past_key_values.", "kv_cache_")):
            dims = [
                manifest["target"]["max_seq_len"] if isinstance(d, str) and d != "batch" else d for d in value["shape"]
            ]
            dims = [1 if d == "batch" else d for d in dims]
            kv += math.prod(dims) * _DTYPE_BYTES.get(value["dtype"], 4)
    arch = manifest["architecture"]
    vocab = arch["vocab_size"]
    if manifest.get("format") == "tflite":  # prefill computes no logits: one token's, and the longest prefill's
        longest = max(manifest["target"].get("prefill_lens", [prompt_len]))  # attention scores
        activations = vocab * 4 + longest * arch["num_heads"] * manifest["target"]["max_seq_len"] * 4
    else:  # the prompt's logits, the largest single tensor: one row where the package gives the last only
        rows = 1 if manifest["target"].get("logits") == "last" else prompt_len
        activations = rows * vocab * 4
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


def _weight_bytes(model_file: Path) -> tuple[int, int]:
    """(bytes of all initializers, bytes one decode step reads: a Gather table only one row)."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    gathered = set()  # tables read one row per token: the data, and a quantized table's scales and zero points
    for n in model.graph.node:
        if n.op_type == "Gather":
            gathered.add(n.input[0])
        elif n.op_type == "GatherBlockQuantized":
            gathered.update(n.input[i] for i in (0, 2, 3) if i < len(n.input))
    total = per_token = 0
    for init in model.graph.initializer:
        size = _initializer_bytes(init)
        total += size
        rows = init.dims[0] if init.dims else 1
        per_token += size // rows if init.name in gathered and rows else size
    return total, per_token


def _initializer_bytes(init) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(init.raw_data) or math.prod(init.dims) * 4
