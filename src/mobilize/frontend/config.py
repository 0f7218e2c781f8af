"""The one config every Llama-like decoder is described by, and the sizes derived from it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from mobilize.errors import ConfigError

FULL, SLIDING = "full_attention", "sliding_attention"
MAX_DIMENSION = 1 << 24
# besides the default; factors: llama.cpp's rope_freqs divisors; longrope: Phi-3's per-pair divisors and a magnitude
ROPE_TYPES = ("linear", "llama3", "factors", "longrope")


def is_positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def rope_scaling_problems(items: Any) -> list[str]:
    """What is wrong with a rope_scaling (as items): a supported type with every field it needs, finite."""
    if items is None:
        return []
    try:
        s = dict(items)
    except (TypeError, ValueError):
        return [f"rope_scaling={_short(items)} must be an object"]
    kind = s.get("rope_type", s.get("type"))
    if kind not in ROPE_TYPES:
        return [f"rope_scaling type {_short(kind)} is not supported (default, {', '.join(ROPE_TYPES)})"]
    if kind == "factors":
        factors = s.get("factors")
        if not isinstance(factors, tuple) or not factors or not all(is_positive_number(f) for f in factors):
            return ["rope_freqs must hold finite positive divisors"]
        return []
    if kind == "longrope":
        bad = [k for k in ("short_factor", "long_factor") if not isinstance(s.get(k), tuple) or not s[k]
               or not all(is_positive_number(f) for f in s[k])]  # fmt: skip
        bad += [k for k in ("attention_factor", "original_max_position_embeddings") if not is_positive_number(s.get(k))]
        return [f"rope_scaling (longrope) needs finite positive {', '.join(bad)}"] if bad else []
    need = ["factor"] + (["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                         if kind == "llama3" else [])  # fmt: skip
    bad = [f"{k}={_short(s.get(k))}" for k in need if not is_positive_number(s.get(k))]
    if bad:
        return [f"rope_scaling ({kind}) needs finite positive {', '.join(bad)}"]
    if kind == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
        return ["rope_scaling (llama3): high_freq_factor must be above low_freq_factor"]
    return []


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    layer_types: tuple[str, ...]
    rope_local_theta: float | None = None  # rope base of sliding-window layers (gemma3)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_scaling of global layers, as items
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # silu | gelu_tanh
    attention_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # gemma: norms before and after attention and MLP
    norm_plus_one: bool = False  # gemma stores w and scales by (1 + w)
    scale_embeddings: bool = False  # gemma multiplies embeddings by sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale is its -0.5 power; else head_dim's
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rotary_dim: int | None = None  # partial rotary (phi3's partial_rotary_factor): the first dims of a head; else all

    def __post_init__(self) -> None:
        problems = []
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
            "rotary_dim",
        ):
            v = getattr(self, field)
            if field == "rotary_dim" and v is None:
                continue
            if type(v) is not int or not 0 < v <= MAX_DIMENSION:
                problems.append(f"{field}={_short(v)} must be an integer from 1 to {MAX_DIMENSION}")
        for field, optional in (("rms_norm_eps", False), ("rope_theta", False), ("rope_local_theta", True),
                                ("query_pre_attn_scalar", True), ("final_logit_softcapping", True),
                                ("attn_logit_softcapping", True)):  # fmt: skip
            v = getattr(self, field)
            if not (optional and v is None) and not is_positive_number(v):
                problems.append(f"{field}={_short(v)} must be a finite positive number")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window <= 0):
            problems.append(f"sliding_window={_short(self.sliding_window)} must be a positive integer")
        for field in ("tie_word_embeddings", "attention_bias", "qk_norm", "sandwich_norm", "norm_plus_one",
                      "scale_embeddings"):  # fmt: skip
            if type(getattr(self, field)) is not bool:
                problems.append(f"{field}={_short(getattr(self, field))} must be true or false")
        if not isinstance(self.layer_types, tuple) or any(t not in (FULL, SLIDING) for t in self.layer_types):
            problems.append(f"layer_types={_short(self.layer_types)} must list {FULL!r} or {SLIDING!r} per layer")
        problems += rope_scaling_problems(self.rope_scaling)
        if problems:
            raise ConfigError(f"{self.family} config: " + "; ".join(problems))
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rotary_dims % 2 or self.rotary_dims > self.head_dim:
            problems.append(f"rotary_dim={self.rotary_dims} must be even and at most head_dim={self.head_dim}")
        scaling = dict(self.rope_scaling or ())
        for key in ("factors", "short_factor", "long_factor"):
            if key in scaling and len(scaling[key]) != self.rotary_dims // 2:
                what = "rope_freqs" if key == "factors" else f"longrope's {key}"
                problems.append(f"{what} has {len(scaling[key])} divisors for {self.rotary_dims // 2} rotary pairs")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        if SLIDING in self.layer_types and not self.sliding_window:
            problems.append("sliding-window layers need sliding_window")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            problems.append(f"hidden_act={_short(self.hidden_act)} is not supported (silu, gelu_tanh)")
        if problems:
            raise ConfigError(f"{self.family} config: " + "; ".join(problems))

    # ---- derived sizes, computed in one place ----
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dims(self) -> int:
        """How many of a head's dims are rotated (the first ones, rotate-half within them)."""
        return self.rotary_dim or self.head_dim

    @property
    def rope_magnitude(self) -> float:
        """What cos and sin are multiplied by: longrope's attention factor, else 1."""
        return float(dict(self.rope_scaling or ()).get("attention_factor", 1.0))

    @property
    def static_context(self) -> tuple[int, str]:
        """The longest cache a package of this model can hold, and why when it is shorter than the model's context:
        LongRoPE's long factors apply past its original context, and a package's rotary tables are fixed (the
        short ones, `rope_inv_freq`)."""
        scaling = dict(self.rope_scaling or ())
        original = scaling.get("original_max_position_embeddings")
        if scaling.get("rope_type") == "longrope" and original < self.max_position_embeddings:
            return original, (f" that a package can hold: LongRoPE switches to its long factors past the original "
                              f"{original} positions, and a package's rotary tables are fixed")  # fmt: skip
        return self.max_position_embeddings, ""

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in expected_shapes(self).values())

    def rope_inv_freq(self, layer_type: str) -> np.ndarray:
        """Inverse frequencies of one layer type's rotary embedding, as transformers computes them."""
        if layer_type == SLIDING and self.rope_local_theta is not None:
            return _inv_freq(self.rope_local_theta, self.rotary_dims)
        inv = _inv_freq(self.rope_theta, self.rotary_dims)
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return inv
        if kind == "linear":
            return (inv / np.float32(scaling["factor"])).astype(np.float32)
        if kind == "llama3":
            return _llama3_inv_freq(inv, scaling)
        if kind == "factors":
            return (inv / np.asarray(scaling["factors"], np.float32)).astype(np.float32)
        if kind == "longrope":  # the short factors: a package's context stays within the original one (checked)
            rd = self.rotary_dims
            exponent = np.arange(0, rd, 2, dtype=np.int64).astype(np.float32) / np.float32(rd)
            wavelengths = np.asarray(scaling["short_factor"], np.float32) * np.float32(self.rope_theta) ** exponent
            return (1.0 / wavelengths).astype(np.float32)
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def _inv_freq(base: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(base) ** exponent)).astype(np.float32)


def _llama3_inv_freq(inv: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out).astype(np.float32)


def layer_weight_names(cfg: DecoderConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Canonical (Hugging Face) names and [out, in] shapes of layer i's tensors."""
    p = f"model.layers.{i}."
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (cfg.q_size, h),
        p + "self_attn.k_proj.weight": (cfg.kv_size, h),
        p + "self_attn.v_proj.weight": (cfg.kv_size, h),
        p + "self_attn.o_proj.weight": (h, cfg.q_size),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
    }
    if cfg.attention_bias:
        shapes |= {
            p + "self_attn.q_proj.bias": (cfg.q_size,),
            p + "self_attn.k_proj.bias": (cfg.kv_size,),
            p + "self_attn.v_proj.bias": (cfg.kv_size,),
        }
    if cfg.qk_norm:
        shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    if cfg.sandwich_norm:
        shapes |= {p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
    return shapes


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by canonical name, with its shape."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    for i in range(cfg.num_layers):
        shapes |= layer_weight_names(cfg, i)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def config_from_record(arch: dict[str, Any]) -> DecoderConfig:
    """A config back from its manifest record (dataclasses.asdict, JSON lists for tuples), checked again."""

    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    try:
        return DecoderConfig(**{k: tuples(v) for k, v in arch.items()})
    except TypeError as e:
        raise ConfigError(f"the manifest's architecture cannot be read: {e}") from None
