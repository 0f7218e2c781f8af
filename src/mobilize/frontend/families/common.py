"""Config parsing shared by every family: Hugging Face config.json and GGUF metadata keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mobilize.errors import ConfigError
from mobilize.frontend.config import FULL, SLIDING, DecoderConfig

# Generous ceilings, so an absurd config is refused before anything is sized from it.
_LIMITS = {
    "num_hidden_layers": 1024,
    "block_count": 1024,
    "num_attention_heads": 1024,
    "attention.head_count": 1024,
    "hidden_size": 1 << 17,
    "embedding_length": 1 << 17,
    "intermediate_size": 1 << 19,
    "feed_forward_length": 1 << 19,
    "vocab_size": 1 << 23,
}


def need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where} lacks {key!r}")
    value = d[key]
    if key in _LIMITS and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _LIMITS[key]):
        raise ConfigError(f"{where}: {key}={value!r} must be an integer from 1 to {_LIMITS[key]}")
    return value


def hf_rope(d: dict[str, Any]) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling items) from either transformers 4 (flat) or 5 (rope_parameters)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # per layer type (gemma3, transformers 5)
        params = params[FULL]
    if isinstance(params, dict):
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return float(theta), None
    return float(theta), tuple(sorted(scaling.items()))


def hf_base(d: dict[str, Any], family: str, **quirks: Any) -> DecoderConfig:
    """The fields every Llama-like config.json spells the same way; `quirks` override or add."""
    where = f"config.json ({family})"
    heads = int(need(d, "num_attention_heads", where))
    hidden = int(need(d, "hidden_size", where))
    layers = int(need(d, "num_hidden_layers", where))
    theta, scaling = hf_rope(d)
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=int(need(d, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(need(d, "intermediate_size", where)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        layer_types=tuple(d.get("layer_types") or [FULL] * layers),
    )
    fields |= quirks
    try:
        return DecoderConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def gguf_base(meta: dict[str, Any], family: str, **quirks: Any) -> DecoderConfig:
    """The fields every llama.cpp architecture stores under `<arch>.*` keys."""
    arch = meta["general.architecture"]
    where = f"GGUF metadata ({arch})"

    def key(k: str, default: Any = None) -> Any:
        if f"{arch}.{k}" not in meta and default is not None:
            return default
        return need({k: meta.get(f"{arch}.{k}")}, k, where)

    heads = int(key("attention.head_count"))
    kv = key("attention.head_count_kv", heads)
    if isinstance(kv, list):  # per-layer counts: only uniform ones are supported
        if len(set(kv)) != 1:
            raise ConfigError(f"{where}: per-layer KV head counts {sorted(set(kv))} are not supported")
        kv = kv[0]
    hidden = int(key("embedding_length"))
    layers = int(key("block_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=int(vocab or 0),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 4096)),
        layer_types=(FULL,) * layers,
    )
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        fields["rope_scaling"] = (("factor", float(key("rope.scaling.factor"))), ("rope_type", "linear"))
    fields |= quirks
    return DecoderConfig(**fields)


def _f32(x: float) -> float:
    """GGUF stores float32: read 1e-05, not 9.99999974e-06."""
    return float(f"{float(x):.7g}")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (interleaved rotary pairs -> rotate-half halves)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows, the inverse of `unpermute_rotary` (used to write GGUFs)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_layer_types(d: dict[str, Any], layers: int, window_all: bool) -> tuple[str, ...]:
    """layer_types as transformers derives them when config.json does not list them."""
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    if window_all and d.get("sliding_window"):
        return (SLIDING,) * layers
    return (FULL,) * layers


def tiny_config(family: str, **overrides: Any) -> DecoderConfig:
    """A family's `tiny()`: vocab 128, two layers of width 64 unless the family overrides, for fast tests."""
    fields: dict[str, Any] = dict(
        family=family, vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=256,
    )  # fmt: skip
    fields |= overrides
    fields.setdefault("layer_types", (FULL,) * fields["num_layers"])
    return DecoderConfig(**fields)


# llama.cpp's per-layer tensor names (blk.<i>.<name>.weight|bias) -> Hugging Face's (model.layers.<i>.<name>.*)
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}


def no_fix(cfg: DecoderConfig, name: str, w: np.ndarray) -> np.ndarray:
    """A family whose GGUF tensors are stored as transformers stores them."""
    return w


@dataclasses.dataclass(frozen=True)
class ChatRoles:
    """A chat template's turn markers: (prefix, suffix) per role, and the text that ends a turn."""

    user: tuple[str, str]
    model: tuple[str, str]
    end_of_turn: str


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything mobilize knows of one architecture family, in one record, in the family's own file."""

    name: str
    hf_model_types: tuple[str, ...]  # config.json's model_type
    gguf_arch: str  # llama.cpp's general.architecture
    genai_type: str  # ONNX Runtime GenAI's model type (genai_config.json)
    tokenizer_class: str  # tokenizer_config.json's class for a tokenizer converted from a GGUF
    from_hf: Callable[[dict[str, Any]], DecoderConfig]
    from_gguf: Callable[[dict[str, Any]], DecoderConfig]
    tiny: Callable[[], DecoderConfig]  # vocab 128, a few narrow layers: the fast tests' model
    to_hf: Callable[[DecoderConfig], dict[str, Any]]  # config.json of a config (the tests write checkpoints)
    gguf_fix: Callable[[DecoderConfig, str, np.ndarray], np.ndarray] = no_fix  # llama.cpp's storage -> HF's
    gguf_layer_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: GGUF_LAYER_NAMES)
    chat: ChatRoles | None = None  # turn markers, where the tokenizer carries them
