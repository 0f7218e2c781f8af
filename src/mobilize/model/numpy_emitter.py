"""The decoder (model/decoder.py) computed in float32 numpy: calibration statistics, and a reference that
needs no torch.

Values are lists of arrays, one per sequence ([tokens, ...], no batch axis), so the decoder goes a layer at a
time over all sequences: with `keep_weights=False` only the current layer's weights are in memory, whatever
the model's size. `cache` (one sequence) keeps each layer's keys and values between calls, for decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mobilize.frontend.config import SLIDING, DecoderConfig
from mobilize.model.weights import norm_weight

F32 = np.float32
HEAD = "lm_head.weight"  # the head's input statistics, whether the head is tied to the embedding or not
EMBEDDING = "model.embed_tokens.weight"


class NumpyEmitter:
    def __init__(
        self,
        cfg: DecoderConfig,
        weights: Mapping[str, Any],
        sequences: list[list[int]],
        *,
        statistics: dict[str, np.ndarray] | None = None,
        logits: bool = True,
        keep_weights: bool = False,
        loaded: dict[str, np.ndarray] | None = None,
        cache: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """`statistics`: filled with the sum over positions of each linear layer's input squared, per input
        channel (float64), and the head's under HEAD. `loaded`: weights already read (shared between calls)."""
        self.cfg, self.ckpt, self.sequences = cfg, weights, sequences
        self.sums = statistics
        self.wants_logits = True  # the decoder runs to the head (whose input statistics calibration needs) ...
        self.logits = logits  # ... and the head's product is computed only if asked for
        self.keep_weights = keep_weights
        self.loaded = {} if loaded is None else loaded
        self.cache = cache
        if cache is not None and len(sequences) != 1:
            raise ValueError("a cache holds one sequence")
        self._layer: str | None = None
        self.start = 0 if not cache else cache[0][0].shape[0]

    def load(self, name: str) -> np.ndarray:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if not self.keep_weights and layer is not None and layer != self._layer:
            self.loaded.clear()  # one layer's weights in memory at a time
            self._layer = layer
        if name not in self.loaded:
            self.loaded[name] = norm_weight(self.cfg, name, np.asarray(self.ckpt[name].load(), F32))
        return self.loaded[name]

    def _record(self, name: str, xs: list[np.ndarray]) -> None:
        if self.sums is not None:
            for x in xs:
                x2 = x.reshape(-1, x.shape[-1])
                self.sums[name] = self.sums.get(name, 0.0) + np.einsum("sk,sk->k", x2, x2, dtype=np.float64)

    # ---- the Emitter ----
    def embed(self) -> list[np.ndarray]:
        ref = self.ckpt[EMBEDDING]
        if ref.raw is None and self.keep_weights:  # a float table read once (shared with a tied head)
            if EMBEDDING not in self.loaded:
                self.loaded[EMBEDDING] = np.asarray(ref.load(), F32)
            return [self.loaded[EMBEDDING][np.asarray(s)] for s in self.sequences]
        return [embedding_rows(ref, s) for s in self.sequences]

    def scale(self, xs, factor: float):
        return [x * F32(factor) for x in xs]

    def positions(self, layer_types: list[str]) -> dict:
        out = {}
        for kind in layer_types:
            per_seq = []
            for s in self.sequences:
                n = len(s)
                pos = np.arange(self.start, self.start + n)
                freqs = pos.astype(F32)[:, None] * self.cfg.rope_inv_freq(kind).astype(F32)[None, :]
                emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
                keys = np.arange(self.start + n)
                allowed = keys[None, :] <= pos[:, None]
                if kind == SLIDING:
                    allowed &= keys[None, :] > pos[:, None] - self.cfg.sliding_window
                cos, sin = np.cos(emb), np.sin(emb)
                if self.cfg.rope_magnitude != 1.0:  # longrope's attention factor
                    cos, sin = cos * F32(self.cfg.rope_magnitude), sin * F32(self.cfg.rope_magnitude)
                per_seq.append((cos, sin, allowed))
            out[kind] = per_seq
        return out

    def norm(self, xs, weight: str):
        w, eps = self.load(weight), F32(self.cfg.rms_norm_eps)
        return [x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w for x in xs]

    def linear(self, xs, name: str, bias: bool = False):
        self._record(name, xs)
        w = self.load(name + ".weight")
        ys = [x @ w.T for x in xs]
        if bias:
            b = self.load(name + ".bias")
            for y in ys:
                y += b
        return ys

    def heads(self, xs, n: int):
        return [x.reshape(x.shape[0], n, self.cfg.head_dim) for x in xs]

    def rope(self, xs, positions):
        out = []
        rd = self.cfg.rotary_dims  # partial rotary: the first rd dims rotate, the rest pass through
        for x, (cos, sin, _) in zip(xs, positions, strict=True):
            r, half = x[..., :rd], rd // 2
            rotated = np.concatenate([-r[..., half:], r[..., :half]], axis=-1)
            y = r * cos + rotated * sin
            out.append(y if rd == x.shape[-1] else np.concatenate([y, x[..., rd:]], axis=-1))
        return out

    def attention(self, i: int, qs, ks, vs, positions):
        cfg = self.cfg
        d, kvh, groups = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        out = []
        for q, k, v, (_, _, allowed) in zip(qs, ks, vs, positions, strict=True):
            if self.cache is not None:
                if len(self.cache) <= i:
                    self.cache.append((k[:0], v[:0]))
                k, v = (np.concatenate([past, new]) for past, new in zip(self.cache[i], (k, v), strict=True))
                self.cache[i] = (k, v)
            n = q.shape[0]
            q = q.transpose(1, 0, 2).reshape(kvh, groups * n, d)  # grouped: [kv_heads, groups * n, d]
            scores = (q @ k.transpose(1, 2, 0)) * F32(cfg.attn_scale)
            if cfg.attn_logit_softcapping:
                scores = np.tanh(scores / F32(cfg.attn_logit_softcapping)) * F32(cfg.attn_logit_softcapping)
            scores = np.where(np.tile(allowed, (groups, 1))[None], scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            out.append((probs @ v.transpose(1, 0, 2)).reshape(cfg.num_heads, n, d).transpose(1, 0, 2).reshape(n, -1))
        return out

    def add(self, a, b):
        return [x + y for x, y in zip(a, b, strict=True)]

    def mul(self, a, b):
        return [x * y for x, y in zip(a, b, strict=True)]

    def activation(self, xs, kind: str):
        if kind == "silu":
            return [x / (F32(1.0) + np.exp(-x)) for x in xs]
        out = []
        for g in xs:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g / (1 + exp(-2z)) (numpy's exp is vectorized)
            z = g * g
            z *= F32(0.044715)
            z += F32(1.0)
            z *= g * F32(-2.0 * np.sqrt(2 / np.pi))
            with np.errstate(over="ignore"):
                out.append(g / (F32(1.0) + np.exp(z)))
        return out

    def head(self, xs):
        self._record(HEAD, xs)
        if not self.logits:
            return None
        name = EMBEDDING if self.cfg.tie_word_embeddings else HEAD
        if name not in self.loaded:
            self.loaded[name] = np.asarray(self.ckpt[name].load(), F32)
        w = self.loaded[name]
        return [x @ w.T for x in xs]

    def softcap(self, xs, cap: float):
        if xs is None:  # no logits computed
            return None
        return [np.tanh(x / F32(cap)) * F32(cap) for x in xs]


def embedding_rows(ref, ids: list[int]) -> np.ndarray:
    """The embedding rows of `ids`; from a GGUF, only those rows' blocks are dequantized."""
    if ref.raw is not None:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = np.asarray(ref.raw()[np.asarray(ids)])
        return dequantize(rows, GGMLQuantizationType[ref.dtype]).reshape(len(ids), -1).astype(F32, copy=False)
    return np.asarray(ref.load(), F32)[np.asarray(ids)]
