"""`genai_config.json`: what ONNX Runtime GenAI (`onnxruntime_genai.Model(package_dir)`) reads to run a package."""

from __future__ import annotations

from typing import Any

# Our family -> the model type GenAI knows (transformers' model_type spelling).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


def genai_config(arch: dict[str, Any], tokens: dict[str, int | list[int] | None], max_length: int) -> dict[str, Any]:
    """The config for a decoder with our I/O names and a cache that grows (no shared past/present buffer).

    `arch` is the DecoderConfig as a dict; `tokens` has bos_token_id, eos_token_id and pad_token_id."""
    eos = tokens.get("eos_token_id")
    model: dict[str, Any] = {
        "type": GENAI_TYPES[arch["family"]],
        "vocab_size": arch["vocab_size"],
        "context_length": arch["max_position_embeddings"],
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
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": arch["head_dim"],
                "hidden_size": arch["hidden_size"],
                "num_attention_heads": arch["num_heads"],
                "num_key_value_heads": arch["num_kv_heads"],
                "num_hidden_layers": arch["num_layers"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
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
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
