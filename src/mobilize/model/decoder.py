"""The decoder, written once: every family's layers as calls on an `Emitter`.

A family differs from Llama only in data on its `DecoderConfig` (q/k norm, norms before and after attention
and MLP, gelu-tanh, scaled embeddings, soft-capping, sliding-window layers). Each target supplies an emitter
that turns these calls into its own ops: the ONNX emitter records the plain graph the ONNX passes lift
(targets/onnx/emitter.py), the TFLite emitter lowers one signature (targets/tflite/emitter.py), and the numpy
emitter computes the values (model/numpy_emitter.py: calibration, and a reference that needs no torch). The
order of the calls is part of the contract: emitters name what they emit in call order, so the same calls
give byte-identical graphs.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeVar

from mobilize.frontend.config import DecoderConfig

V = TypeVar("V")  # an emitter's value: a graph value, a tensor index, an array


class Emitter(Protocol[V]):
    """What the decoder needs of a target. Weights are named by their canonical (Hugging Face) names."""

    wants_logits: bool  # False: a signature that only fills the cache (TFLite prefill) stops after the layers

    def embed(self) -> V:
        """The input tokens' embedding rows, as float, [..., hidden]."""

    def scale(self, x: V, factor: float) -> V: ...

    def positions(self, layer_types: list[str]) -> dict[str, Any]:
        """Per layer type, what `rope` and `attention` need of the positions (rotary tables, masks)."""

    def norm(self, x: V, weight: str) -> V:
        """RMSNorm over the last axis with the named weight (its (1 + w) form, where the family stores w)."""

    def linear(self, x: V, name: str, bias: bool = False) -> V:
        """x @ W.T (+ b) with `name + ".weight"` [out, in] (and `name + ".bias"`)."""

    def heads(self, x: V, n: int) -> V:
        """[..., n * head_dim] -> n heads of head_dim, in the emitter's layout."""

    def rope(self, x: V, positions: Any) -> V:
        """Rotary embedding (rotate-half) of per-head values."""

    def attention(self, layer: int, q: V, k: V, v: V, positions: Any) -> V:
        """Scaled dot-product attention of q over the layer's cache with k and v appended (grouped-query,
        causal, its layer type's window), [..., num_heads * head_dim]."""

    def add(self, a: V, b: V) -> V: ...

    def mul(self, a: V, b: V) -> V: ...

    def activation(self, x: V, kind: str) -> V:
        """silu or gelu_tanh."""

    def head(self, x: V) -> V:
        """The output projection: lm_head, or the tied embedding."""

    def softcap(self, x: V, cap: float) -> V:
        """cap * tanh(x / cap)."""


def decode(cfg: DecoderConfig, e: Emitter) -> Any:
    """The whole decoder on an emitter: its logits, or None when the emitter wants none."""
    x = e.embed()
    if cfg.scale_embeddings:
        x = e.scale(x, math.sqrt(cfg.hidden_size))
    positions = e.positions(sorted(set(cfg.layer_types)))
    for i, kind in enumerate(cfg.layer_types):
        x = layer(cfg, e, i, x, positions[kind])
    if not e.wants_logits:
        return None
    logits = e.head(e.norm(x, "model.norm.weight"))
    if cfg.final_logit_softcapping:
        logits = e.softcap(logits, cfg.final_logit_softcapping)
    return logits


def layer(cfg: DecoderConfig, e: Emitter, i: int, x: Any, positions: Any) -> Any:
    p = f"model.layers.{i}."
    h = e.norm(x, p + "input_layernorm.weight")
    attn = attention(cfg, e, i, h, positions)
    if cfg.sandwich_norm:
        attn = e.norm(attn, p + "post_attention_layernorm.weight")
    x = e.add(x, attn)
    h = e.norm(x, p + ("pre_feedforward_layernorm.weight" if cfg.sandwich_norm else "post_attention_layernorm.weight"))
    out = mlp(cfg, e, p + "mlp.", h)
    if cfg.sandwich_norm:
        out = e.norm(out, p + "post_feedforward_layernorm.weight")
    return e.add(x, out)


def attention(cfg: DecoderConfig, e: Emitter, i: int, h: Any, positions: Any) -> Any:
    p = f"model.layers.{i}.self_attn."

    def heads(name: str, n: int) -> Any:
        y = e.heads(e.linear(h, p + name, cfg.attention_bias), n)
        if cfg.qk_norm and name in ("q_proj", "k_proj"):
            y = e.norm(y, p + name[0] + "_norm.weight")
        return y

    q = e.rope(heads("q_proj", cfg.num_heads), positions)
    k = e.rope(heads("k_proj", cfg.num_kv_heads), positions)
    v = heads("v_proj", cfg.num_kv_heads)
    return e.linear(e.attention(i, q, k, v, positions), p + "o_proj")


def mlp(cfg: DecoderConfig, e: Emitter, p: str, h: Any) -> Any:
    act = e.activation(e.linear(h, p + "gate_proj"), cfg.hidden_act)
    return e.linear(e.mul(act, e.linear(h, p + "up_proj")), p + "down_proj")
