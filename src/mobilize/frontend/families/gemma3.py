"""Gemma 3 (text): sliding-window layers with their own rope base, q/k norm, norms before and after
attention and MLP, gelu-tanh, embeddings scaled by sqrt(hidden), a tied head, and (1 + w) norms."""

from __future__ import annotations

from typing import Any

import numpy as np

from mobilize.errors import ConfigError
from mobilize.frontend.config import FULL, SLIDING, DecoderConfig, is_norm
from mobilize.frontend.families.common import (
    GGUF_LAYER_NAMES,
    ChatRoles,
    Family,
    gguf_base,
    hf_base,
    integer,
    need,
    tiny_config,
)

_QUIRKS = dict(
    qk_norm=True,
    sandwich_norm=True,
    norm_plus_one=True,
    scale_embeddings=True,
    hidden_act="gelu_tanh",
    tie_word_embeddings=True,
)


def _pattern(layers: int, every: int = 6) -> tuple[str, ...]:
    """Five sliding-window layers, then one global: Gemma 3's fixed pattern."""
    return tuple(FULL if (i + 1) % every == 0 else SLIDING for i in range(layers))


def from_hf(d: dict[str, Any]) -> DecoderConfig:
    layers = need(d, "num_hidden_layers", "config.json")
    params = d.get("rope_parameters") or {}
    local = params.get(SLIDING, {}).get("rope_theta") if isinstance(params, dict) else None
    every = integer(d.get("sliding_window_pattern", 6), "sliding_window_pattern", "config.json")
    layer_types = d.get("layer_types") or _pattern(layers, max(every, 1))
    if not isinstance(layer_types, (list, tuple)):
        raise ConfigError(f"config.json: layer_types={repr(layer_types)[:60]} must be a list")
    return hf_base(
        d,
        "gemma3",
        **_QUIRKS,
        rope_local_theta=local or d.get("rope_local_base_freq", 10000.0),
        sliding_window=d.get("sliding_window") or 512,
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar") or d.get("head_dim") or 256,
        final_logit_softcapping=d.get("final_logit_softcapping"),
        attn_logit_softcapping=d.get("attn_logit_softcapping"),
    )


def from_gguf(meta: dict[str, Any]) -> DecoderConfig:
    layers = need({"block_count": meta.get("gemma3.block_count")}, "block_count", "GGUF metadata")
    head_dim = meta.get("gemma3.attention.key_length", 256)
    # llama.cpp keeps the local rope base (10k) and the 5:1 pattern in code, not in the file.
    return gguf_base(
        meta,
        "gemma3",
        **_QUIRKS,
        rope_local_theta=10000.0,
        sliding_window=meta.get("gemma3.attention.sliding_window", 512),
        layer_types=_pattern(layers),
        query_pre_attn_scalar=head_dim,
    )


def gguf_fix(cfg: DecoderConfig, name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp stores Gemma norms as (1 + w); we keep transformers' w."""
    return w - np.float32(1.0) if is_norm(name) else w


def tiny() -> DecoderConfig:
    layers = 6  # one whole period of the 5:1 sliding/global pattern
    return tiny_config(
        "gemma3", num_layers=layers, num_kv_heads=1, head_dim=32, rope_local_theta=1e4, sliding_window=4,
        layer_types=_pattern(layers), query_pre_attn_scalar=32.0, **_QUIRKS,
    )  # fmt: skip


def to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return dict(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={
            FULL: {"rope_type": "default", "rope_theta": cfg.rope_theta},
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
        },
        sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types),
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    )


FAMILY = Family(
    name="gemma3",
    hf_model_types=("gemma3_text",),
    gguf_arch="gemma3",
    genai_type="gemma3_text",
    tokenizer_class="GemmaTokenizer",
    from_hf=from_hf,
    from_gguf=from_gguf,
    tiny=tiny,
    to_hf=to_hf,
    gguf_fix=gguf_fix,
    # four norms per layer: llama.cpp's ffn_norm is Gemma's pre-MLP norm
    gguf_layer_names=GGUF_LAYER_NAMES
    | {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    chat=ChatRoles(
        user=("<start_of_turn>user\n", "<end_of_turn>\n"),
        model=("<start_of_turn>model\n", "<end_of_turn>\n"),
        end_of_turn="<end_of_turn>",
    ),
)
