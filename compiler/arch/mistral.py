"""Mistral: Llama's layout, with an optional sliding window on every layer."""

from __future__ import annotations

from typing import Any

from mobilize.compiler.arch import llama
from mobilize.compiler.arch.common import gguf_base, hf_base, hf_layer_types, need
from mobilize.compiler.arch.config import FULL, DecoderConfig

HF_MODEL_TYPES = ("mistral",)
gguf_fix = llama.gguf_fix  # llama.cpp converts Mistral as a llama


def from_hf(d: dict[str, Any]) -> DecoderConfig:
    layers = need(d, "num_hidden_layers", "config.json")
    return hf_base(
        d, "mistral", sliding_window=d.get("sliding_window"), layer_types=hf_layer_types(d, layers, window_all=True)
    )


def from_gguf(meta: dict[str, Any]) -> DecoderConfig:
    return gguf_base(meta, "mistral")


def tiny() -> DecoderConfig:
    return DecoderConfig(
        family="mistral",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        layer_types=(FULL,) * 2,
        max_position_embeddings=256,
    )


def to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        sliding_window=cfg.sliding_window,
        **llama._common_hf(cfg),
    )
