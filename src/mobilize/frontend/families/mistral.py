"""Mistral: Llama's layout, with an optional sliding window on every layer."""

from __future__ import annotations

from typing import Any

from mobilize.frontend.config import DecoderConfig
from mobilize.frontend.families import llama
from mobilize.frontend.families.common import Family, gguf_base, hf_base, hf_layer_types, need, tiny_config


def from_hf(d: dict[str, Any]) -> DecoderConfig:
    layers = need(d, "num_hidden_layers", "config.json")
    return hf_base(
        d, "mistral", sliding_window=d.get("sliding_window"), layer_types=hf_layer_types(d, layers, window_all=True)
    )


def from_gguf(meta: dict[str, Any]) -> DecoderConfig:
    return gguf_base(meta, "mistral")


def tiny() -> DecoderConfig:
    return tiny_config("mistral", intermediate_size=160, num_kv_heads=1, rms_norm_eps=1e-5)


def to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        sliding_window=cfg.sliding_window,
        **llama._common_hf(cfg),
    )


FAMILY = Family(
    name="mistral",
    hf_model_types=("mistral",),
    gguf_arch="mistral",
    genai_type="mistral",
    tokenizer_class="LlamaTokenizer",
    from_hf=from_hf,
    from_gguf=from_gguf,
    tiny=tiny,
    to_hf=to_hf,
    gguf_fix=llama.gguf_fix,  # llama.cpp converts Mistral as a llama (q/k rows interleaved),
)
