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


def integer(v: Any, key: str, where: str) -> int:
    """A config's integer as it is: JSON's 12, never "12", 12.5 or true (which int() would accept)."""
    if type(v) is not int:
        raise ConfigError(f"{where}: {key}={repr(v)[:60]} must be an integer")
    return v


def number(v: Any, key: str, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ConfigError(f"{where}: {key}={repr(v)[:60]} must be a number")
    return float(v)


def activation(d: dict[str, Any], default: str, where: str) -> str:
    """hidden_activation (Gemma's) or hidden_act, as the decoder names it; anything else is refused, never built
    as the family's usual one."""
    name = d.get("hidden_activation", d.get("hidden_act", default))
    if name not in _ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_act={repr(name)[:60]} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}  # fmt: skip


def hf_rope(d: dict[str, Any]) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling items) from either transformers 4 (flat) or 5 (rope_parameters)."""
    where = "config.json"
    params = d.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # per layer type (gemma3, transformers 5)
        params = params[FULL]
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters={repr(params)[:60]} must be an object")
    if isinstance(params, dict):
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope_scaling={repr(scaling)[:60]} must be an object")
    if scaling and "rope_type" not in scaling and "type" not in scaling:
        raise ConfigError(f"{where}: rope_scaling={repr(scaling)[:60]} has no rope_type")
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return number(theta, "rope_theta", where), None
    return number(theta, "rope_theta", where), tuple(sorted(scaling.items()))


def hf_base(d: dict[str, Any], family: str, **quirks: Any) -> DecoderConfig:
    """The fields every Llama-like config.json spells the same way; `quirks` override or add."""
    where = f"config.json ({family})"
    heads = need(d, "num_attention_heads", where)
    hidden = need(d, "hidden_size", where)
    layers = need(d, "num_hidden_layers", where)
    theta, scaling = hf_rope(d)
    layer_types = d.get("layer_types") or [FULL] * layers
    if not isinstance(layer_types, (list, tuple)):
        raise ConfigError(f"{where}: layer_types={repr(layer_types)[:60]} must be a list")
    default_act = quirks.pop("hidden_act", "silu")  # the family's, where its config.json may say nothing
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=need(d, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=need(d, "intermediate_size", where),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=integer(d.get("num_key_value_heads") or heads, "num_key_value_heads", where),
        head_dim=integer(d.get("head_dim") or hidden // heads, "head_dim", where),
        rms_norm_eps=number(d.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=integer(d.get("max_position_embeddings", 4096), "max_position_embeddings", where),
        tie_word_embeddings=d.get("tie_word_embeddings", False),  # (checked: a boolean, not "false")
        attention_bias=d.get("attention_bias", False),
        hidden_act=activation(d, default_act, where),
        layer_types=tuple(layer_types),
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

    heads = key("attention.head_count")
    kv = key("attention.head_count_kv", heads)
    if isinstance(kv, list):  # per-layer counts: only uniform ones are supported
        if len(set(kv)) != 1:
            raise ConfigError(f"{where}: per-layer KV head counts {sorted(set(kv))} are not supported")
        kv = kv[0]
    hidden = key("embedding_length")
    layers = key("block_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=key("attention.key_length", hidden // heads),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        max_position_embeddings=key("context_length", 4096),
        layer_types=(FULL,) * layers,
    )
    if meta.get("mobilize.tied_head"):
        fields["tie_word_embeddings"] = True
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if meta.get("mobilize.rope_factors") is not None:  # llama.cpp's rope_freqs tensor: per-pair divisors
        fields["rope_scaling"] = (("factors", meta["mobilize.rope_factors"]), ("rope_type", "factors"))
    elif scaling_type == "linear":
        fields["rope_scaling"] = (("factor", key("rope.scaling.factor")), ("rope_type", "linear"))
    elif scaling_type not in (None, "none"):
        raise ConfigError(f"{where}: rope scaling {repr(scaling_type)[:40]} is not supported (linear)")
    fields |= quirks
    return DecoderConfig(**fields)


def _f32(x: float) -> float:
    """GGUF stores float32: read 1e-05, not 9.99999974e-06."""
    return float(f"{number(x, 'value', 'GGUF metadata'):.7g}")


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
    # fused projections (phi3's qkv_proj): layer-relative name -> the canonical weights its rows hold, in order
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
