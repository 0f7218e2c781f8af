"""Qwen2 / Qwen2.5: Llama's layout with biases on the q, k and v projections."""

from __future__ import annotations

from typing import Any

from mobilize.frontend.config import DecoderConfig
from mobilize.frontend.families import llama
from mobilize.frontend.families.common import Family, gguf_base, hf_base, tiny_config


def from_hf(d: dict[str, Any]) -> DecoderConfig:
    # Sliding windows exist in the config but are off in every released Qwen2 (use_sliding_window=false).
    d = {k: v for k, v in d.items() if k != "layer_types"}
    return hf_base(d, "qwen2", attention_bias=True)


def from_gguf(meta: dict[str, Any]) -> DecoderConfig:
    return gguf_base(meta, "qwen2", attention_bias=True)


def tiny() -> DecoderConfig:
    return tiny_config("qwen2", attention_bias=True, tie_word_embeddings=True)


def to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    d = llama._common_hf(cfg)
    d.pop("head_dim")
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False, **d)


FAMILY = Family(
    name="qwen2",
    hf_model_types=("qwen2",),
    gguf_arch="qwen2",
    genai_type="qwen2",
    tokenizer_class="Qwen2Tokenizer",
    from_hf=from_hf,
    from_gguf=from_gguf,
    tiny=tiny,
    to_hf=to_hf,
)
