"""Llama 1/2/3, TinyLlama, SmolLM: the plain family every other one is a variation of."""

from __future__ import annotations

from typing import Any

import numpy as np

from mobilize.frontend.config import DecoderConfig
from mobilize.frontend.families.common import Family, gguf_base, hf_base, tiny_config, unpermute_rotary


def from_hf(d: dict[str, Any]) -> DecoderConfig:
    return hf_base(d, "llama")


def from_gguf(meta: dict[str, Any]) -> DecoderConfig:
    return gguf_base(meta, "llama")


def gguf_fix(cfg: DecoderConfig, name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary kernel; we use rotate-half order."""
    if name.endswith("self_attn.q_proj.weight"):
        return unpermute_rotary(w, cfg.num_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return unpermute_rotary(w, cfg.num_kv_heads)
    return w


def tiny() -> DecoderConfig:
    return tiny_config("llama", rms_norm_eps=1e-5, rope_theta=10000.0)


def to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], **_common_hf(cfg))


def _common_hf(cfg: DecoderConfig) -> dict[str, Any]:
    d = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act=cfg.hidden_act,
    )
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    return d


FAMILY = Family(
    name="llama",
    hf_model_types=("llama",),
    gguf_arch="llama",
    genai_type="llama",
    tokenizer_class="LlamaTokenizer",
    from_hf=from_hf,
    from_gguf=from_gguf,
    tiny=tiny,
    to_hf=to_hf,
    gguf_fix=gguf_fix,
)
