"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's math with q/k/v in one projection and gate/up in another (split into
Llama's names as they are read), partial rotary (Phi-4-mini rotates 3/4 of each head), LongRoPE scaling (per-pair
divisors and a magnitude on cos and sin), and an optional sliding window on every layer."""

from __future__ import annotations

import math
from typing import Any

from mobilize.errors import ConfigError
from mobilize.frontend.config import DecoderConfig
from mobilize.frontend.families import llama
from mobilize.frontend.families.common import (
    GGUF_LAYER_NAMES,
    Family,
    gguf_base,
    hf_base,
    hf_layer_types,
    integer,
    need,
    number,
    tiny_config,
)

FUSED = {  # a fused projection's rows, in order, are these canonical weights' rows
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _factors(v: Any, key: str, where: str) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{where}: rope_scaling {key}={repr(v)[:60]} must be a list of numbers")
    return tuple(number(f, key, where) for f in v)


def longrope(short: Any, long: Any, original: int, max_positions: int, attention_factor: Any, where: str) -> tuple:
    """rope_scaling items for LongRoPE; the attention factor as transformers and llama.cpp derive it when the
    config gives none: sqrt(1 + ln(s) / ln(original)) for s = max_positions / original > 1."""
    if type(original) is not int or original < 2:  # (its logarithm divides)
        raise ConfigError(f"{where}: original_max_position_embeddings={original!r} must be an integer of at least 2")
    if attention_factor is None:
        s = max_positions / original
        attention_factor = math.sqrt(1 + math.log(s) / math.log(original)) if s > 1 else 1.0
    return (
        ("attention_factor", number(attention_factor, "attention_factor", where)),
        ("long_factor", _factors(long, "long_factor", where)),
        ("original_max_position_embeddings", original),
        ("rope_type", "longrope"),
        ("short_factor", _factors(short, "short_factor", where)),
    )


def from_hf(d: dict[str, Any]) -> DecoderConfig:
    where = "config.json (phi3)"
    layers = need(d, "num_hidden_layers", where)
    heads, hidden = need(d, "num_attention_heads", where), need(d, "hidden_size", where)
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    scaling = d.get("rope_scaling") or params
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope_scaling={repr(scaling)[:60]} must be an object")
    factor = d.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    head_dim = integer(d.get("head_dim") or hidden // heads, "head_dim", where)
    rotary = int(head_dim * number(factor, "partial_rotary_factor", where))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    rope_scaling = None
    if kind in ("longrope", "su"):  # (transformers renames Phi-3's early "su" to longrope)
        original = d.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings"))
        original = integer(original, "original_max_position_embeddings", where)
        max_positions = integer(d.get("max_position_embeddings", 4096), "max_position_embeddings", where)
        rope_scaling = longrope(scaling.get("short_factor"), scaling.get("long_factor"), original, max_positions,
                                scaling.get("attention_factor"), where)  # fmt: skip
    elif kind != "default":
        raise ConfigError(f"{where}: rope scaling {repr(kind)[:40]} is not supported for phi3 (default, longrope)")
    plain = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters")}
    plain["rope_theta"] = params.get("rope_theta", d.get("rope_theta", 10000.0))
    return hf_base(
        plain, "phi3", rope_scaling=rope_scaling, rotary_dim=rotary if rotary != head_dim else None,
        sliding_window=d.get("sliding_window"), layer_types=hf_layer_types(d, layers, window_all=True),
    )  # fmt: skip


def from_gguf(meta: dict[str, Any]) -> DecoderConfig:
    """llama.cpp's phi3: `rope.dimension_count` for partial rotary, the LongRoPE factors as the tensors
    rope_factors_short/long (read into our metadata by the loader), `rope.scaling.attn_factor`."""
    where = "GGUF metadata (phi3)"
    heads = need({"n": meta.get("phi3.attention.head_count")}, "n", where)
    head_dim = meta.get("phi3.attention.key_length") or need(meta, "phi3.embedding_length", where) // heads
    rotary = meta.get("phi3.rope.dimension_count", head_dim)
    window = meta.get("phi3.attention.sliding_window") or None  # 0: none (Phi-4)
    layers = need({"block_count": meta.get("phi3.block_count")}, "block_count", where)
    quirks: dict[str, Any] = dict(rotary_dim=rotary if rotary != head_dim else None, sliding_window=window)
    if window:  # every layer, as transformers' Phi3 applies it
        quirks["layer_types"] = ("sliding_attention",) * layers
    if meta.get("mobilize.rope_factors_short") is not None:
        original = integer(meta.get("phi3.rope.scaling.original_context_length"), "original_context_length", where)
        quirks["rope_scaling"] = longrope(
            meta["mobilize.rope_factors_short"], meta.get("mobilize.rope_factors_long"), original,
            meta.get("phi3.context_length", original), meta.get("phi3.rope.scaling.attn_factor"), where,
        )  # fmt: skip
    return gguf_base(meta, "phi3", **quirks)


def tiny() -> DecoderConfig:
    """Phi-4-mini in small: partial rotary (half of a 32-dim head), LongRoPE with a magnitude, a tied head."""
    short = tuple(1.0 + 0.1 * i for i in range(8))
    scaling = longrope(short, tuple(2 * f for f in short), 64, 256, None, "tiny")  # 4x the original 64 positions
    return tiny_config(
        "phi3", num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        rotary_dim=16, tie_word_embeddings=True, rope_scaling=scaling,
    )  # fmt: skip


def to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    d = llama._common_hf(cfg)
    d.pop("rope_scaling", None)
    d.pop("head_dim")
    scaling = dict(cfg.rope_scaling or ())
    if scaling:
        d["rope_scaling"] = dict(rope_type="longrope", short_factor=list(scaling["short_factor"]),
                                 long_factor=list(scaling["long_factor"]))  # fmt: skip
        d["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if cfg.rotary_dim:
        d["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    d["sliding_window"] = cfg.sliding_window
    tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # (Phi3Config's defaults are past a tiny vocab)
    return dict(model_type="phi3", architectures=["Phi3ForCausalLM"], **tokens, **d)


FAMILY = Family(
    name="phi3",
    hf_model_types=("phi3",),
    gguf_arch="phi3",
    genai_type="phi3",
    tokenizer_class="LlamaTokenizer",
    from_hf=from_hf,
    from_gguf=from_gguf,
    tiny=tiny,
    to_hf=to_hf,
    fused=FUSED,
    # llama.cpp's phi3 keeps the fused tensors: attn_qkv, and ffn_up holding gate then up
    gguf_layer_names={k: v for k, v in GGUF_LAYER_NAMES.items() if k not in ("attn_q", "attn_k", "attn_v")}
    | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
)
