"""`genai_config.json`: what ONNX Runtime GenAI (`onnxruntime_genai.Model(package_dir)`) reads to run a package."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.tokenizer import check_special_ids
from mobilize.manifest import Architecture, Io, KvCache, Manifest


def graph_io(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of the graph's inputs and outputs, for the manifest and GenAI."""

    def describe(v: ir.Value) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.inputs], "outputs": [describe(v) for v in model.graph.outputs]}


def genai_config(
    arch: Architecture, tokens: dict[str, int | list[int] | None], io: Io, kv_cache: KvCache, threads: int | None = None
) -> dict[str, Any]:
    """The config for a decoder with our I/O names. With a static cache, GenAI binds one buffer of max_seq_len as
    past and present; otherwise the cache grows to the model's context. `tokens` has bos_token_id, eos_token_id
    and pad_token_id."""
    check_special_ids(tokens, arch.vocab_size)
    static = kv_cache.layout == "static"
    context = arch.record["max_position_embeddings"]
    max_length = kv_cache.max_seq_len if static else context
    input_names = {i.name for i in io.inputs}
    eos = tokens.get("eos_token_id")
    model: dict[str, Any] = {
        "type": FAMILIES[arch.family].genai_type,
        "vocab_size": arch.vocab_size,
        "context_length": context,
        # GenAI wants numbers here; a source that names no such token leaves the key out.
        **({"bos_token_id": tokens["bos_token_id"]} if tokens.get("bos_token_id") is not None else {}),
        "eos_token_id": eos if isinstance(eos, list) else [eos] if eos is not None else [],
        "pad_token_id": tokens.get("pad_token_id") or 0,
    }
    return {
        "model": {
            **model,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {
                    "log_id": "onnxruntime-genai", "provider_options": [],
                    **({"intra_op_num_threads": threads} if threads else {}),  # the device's big cores
                },  # fmt: skip
                "head_size": arch.head_dim,
                "hidden_size": arch.hidden_size,
                "num_attention_heads": arch.num_heads,
                "num_key_value_heads": arch.num_kv_heads,
                "num_hidden_layers": arch.num_layers,
                **_sliding_window(kv_cache),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({"position_ids": "position_ids"} if "position_ids" in input_names else {}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": max_length,
            "min_length": 0,
            "past_present_share_buffer": static,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _sliding_window(kv_cache: KvCache) -> dict[str, Any]:
    """Window-sized ring buffers of sliding layers: GenAI allocates window + cache_slack for those layers."""
    window = kv_cache.details.get("sliding_window")
    if not window:
        return {}
    return {
        "sliding_window": {
            "window_size": window["window"],
            "slide_key_value_cache": False,
            "slide_inputs": False,
            "layers": window["layers"],
            "cache_slack": window["slack"],
        }
    }


def expected_genai_config(manifest: Manifest, found: dict) -> dict[str, Any]:
    """What export writes for this manifest, with the special token ids `found` states (checked: the manifest
    does not hold them)."""
    model = found["model"]
    tokens = {
        "bos_token_id": model.get("bos_token_id"),
        "eos_token_id": model["eos_token_id"],
        "pad_token_id": model["pad_token_id"],
    }
    return genai_config(manifest.architecture, tokens, manifest.io, manifest.kv_cache, manifest.target.threads)
