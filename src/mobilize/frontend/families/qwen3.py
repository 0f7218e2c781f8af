"""Qwen3: no projection biases, RMSNorm on each query and key head (q/k norm), explicit head_dim."""

from __future__ import annotations

from typing import Any

from mobilize.frontend.config import DecoderConfig
from mobilize.frontend.families import llama
from mobilize.frontend.families.common import Family, gguf_base, hf_base, tiny_config


def from_hf(d: dict[str, Any]) -> DecoderConfig:
    d = {k: v for k, v in d.items() if k != "layer_types"}
    return hf_base(d, "qwen3", qk_norm=True)


def from_gguf(meta: dict[str, Any]) -> DecoderConfig:
    return gguf_base(meta, "qwen3", qk_norm=True)


def tiny() -> DecoderConfig:
    return tiny_config("qwen3", head_dim=32, qk_norm=True, tie_word_embeddings=True)


def to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], use_sliding_window=False, **llama._common_hf(cfg)
    )


FAMILY = Family(
    name="qwen3",
    hf_model_types=("qwen3",),
    gguf_arch="qwen3",
    genai_type="qwen3",
    tokenizer_class="Qwen2Tokenizer",
    from_hf=from_hf,
    from_gguf=from_gguf,
    tiny=tiny,
    to_hf=to_hf,
)
