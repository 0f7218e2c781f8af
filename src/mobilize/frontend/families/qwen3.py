"""Qwen3: no projection biases, RMSNorm on each query and key head (q/k norm), explicit head_dim."""

from __future__ import annotations

from typing import Any

from mobilize.frontend.config import DecoderConfig
from mobilize.frontend.families import llama, qwen2
from mobilize.frontend.families.common import gguf_base, hf_base, tiny_config

HF_MODEL_TYPES = ("qwen3",)
gguf_fix = qwen2.gguf_fix


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
