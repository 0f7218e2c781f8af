"""The decoder (model/decoder.py) lowered to TFLite builtin ops, with static shapes and a static KV cache.

LiteRT wants every shape fixed, so the decoder is emitted once per signature:

- `prefill_<L>`: tokens int32 [1, L], input_pos int32 [L] (the position of each token);
- `decode`: tokens [1, 1], input_pos [1];
- every signature: kv_cache_k_<i> / kv_cache_v_<i> float32 (or float16) [1, kv_heads, max_len, head_dim] in and
  out, written with DYNAMIC_UPDATE_SLICE at input_pos[0]; `decode` also returns logits [1, 1, vocab]. A float16
  cache is written through a CAST and read through one (attention itself runs in float32).

Prefill returns no logits (as LiteRT-LM expects: an app prefills all but the prompt's last token and
decodes that one); computing them would make the head (a 262k-row matrix for Gemma) most of the work.

The mask comes from positions (key slot <= query position, and inside the window on sliding layers),
so unwritten or stale slots past the current position are never read. Prefill may be padded at the end:
padded tokens write slots past the prompt that the next decode steps overwrite before reading them.

Attention is grouped without copying the cache: queries as [kv_heads, groups * L, head_dim] against keys
[kv_heads, max_len, head_dim] in BATCH_MATMUL (adj_y), so a global layer reads the cache where it lies; a
sliding-window layer gathers just the window + L - 1 slots its queries can reach (static shapes throughout).
Weights are shared by every signature (one buffer each); a tied head reuses the embedding's buffer.
"""

from __future__ import annotations

import math

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from mobilize.frontend.config import SLIDING
from mobilize.frontend.loader import LoadedModel
from mobilize.frontend.lora import Slots
from mobilize.manifest import KvCache
from mobilize.model.decoder import decode
from mobilize.model.weights import norm_weight
from mobilize.quant.recipes import Recipe
from mobilize.targets.tflite.lora import slot_name
from mobilize.targets.tflite.weights import FcWeights
from mobilize.targets.tflite.writer import TflGraph, TflModel

Op = fb.BuiltinOperator
F32 = np.float32
I32 = np.int32
_NEG = float(np.finfo(np.float32).min)


def kv_names(num_layers: int) -> list[str]:
    return [f"kv_cache_{kind}_{i}" for i in range(num_layers) for kind in ("k", "v")]


class TfliteEmitter:
    """One signature's graph: the decoder's calls as TFLite ops on `g`."""

    def __init__(
        self, model: LoadedModel, weights: FcWeights, max_len: int, g: TflGraph, length: int, logits: bool,
        kv_dtype=F32, slots: dict[str, tuple[int, int]] | None = None, rank: int = 0,
    ):  # fmt: skip
        self.cfg, self.ckpt, self.fc_weights, self.max_len, self.g = model.config, model.weights, weights, max_len, g
        self.slots, self.rank = slots or {}, rank  # LoRA slots: module -> (in, out), inputs of this signature
        self.smoothing = model.smoothing
        self.kv_dtype = np.dtype(kv_dtype)
        self.wants_logits = logits
        cfg = self.cfg
        self.length = length
        self.tokens = g.input("tokens", [1, length], I32)
        self.input_pos = g.input("input_pos", [length], I32)
        kv_shape = [1, cfg.num_kv_heads, max_len, cfg.head_dim]
        self.caches = [g.input(n, kv_shape, self.kv_dtype) for n in kv_names(cfg.num_layers)]

    # ---- helpers ----
    def vector(self, name: str) -> int:
        """A 1-D fp32 checkpoint tensor (norm weights in their (1 + w) form where the family stores w)."""
        ref = self.ckpt[name]
        return self.g.weight(name, ref.shape, F32, 4 * math.prod(ref.shape),
                             lambda: norm_weight(self.cfg, name, np.asarray(ref.load(), dtype=F32)))  # fmt: skip

    def binary(self, code: int, a: int, b: int, dtype=F32) -> int:
        g = self.g
        shape = np.broadcast_shapes(g.shape(a), g.shape(b))
        options = {Op.ADD: fb.AddOptionsT, Op.MUL: fb.MulOptionsT, Op.SUB: fb.SubOptionsT, Op.DIV: fb.DivOptionsT}
        return g.op(code, [a, b], shape, dtype, options[code]() if code in options else None)

    def transpose(self, x: int, perm: list[int]) -> int:
        g = self.g
        shape = [g.shape(x)[p] for p in perm]
        return g.op(Op.TRANSPOSE, [x, g.const(perm)], shape, g.dtype(x), fb.TransposeOptionsT())

    def slice(self, x: int, begin: list[int], size: list[int]) -> int:
        g = self.g
        return g.op(Op.SLICE, [x, g.const(begin), g.const(size)], size, g.dtype(x), fb.SliceOptionsT())

    def unary(self, code: int, x: int) -> int:
        return self.g.op(code, [x], self.g.shape(x))

    def gather_rows(self, table: int, index: int) -> int:
        options = fb.GatherOptionsT()
        options.axis = 0
        g = self.g
        return g.op(Op.GATHER, [table, index], (*g.shape(index), g.shape(table)[1]), F32, options)

    def rope_tables(self, kind: str) -> tuple[int, int]:
        """cos and sin [max_len, head_dim] for every position, as transformers computes them (fp32)."""
        inv = self.cfg.rope_inv_freq(kind)
        freqs = np.arange(self.max_len, dtype=F32)[:, None] * inv[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        if self.cfg.rope_magnitude != 1.0:  # longrope's attention factor
            cos, sin = cos * F32(self.cfg.rope_magnitude), sin * F32(self.cfg.rope_magnitude)
        pass_dims = self.cfg.head_dim - self.cfg.rotary_dims
        if pass_dims:  # partial rotary: the dims past rotary_dim keep x (cos 1, sin 0; see `rope`)
            cos = np.concatenate([cos, np.ones((self.max_len, pass_dims), F32)], axis=-1)
            sin = np.concatenate([sin, np.zeros((self.max_len, pass_dims), F32)], axis=-1)
        return self.g.const(cos.astype(F32), F32), self.g.const(sin.astype(F32), F32)

    # ---- the Emitter ----
    def embed(self) -> int:
        return self.fc_weights.lookup(self.g, self.tokens)

    def scale(self, x: int, factor: float) -> int:
        return self.binary(Op.MUL, x, self.g.const([factor], F32))

    def positions(self, layer_types: list[str]) -> dict:
        """The cache write position [0, 0, input_pos[0], 0], and per layer type the mask from positions (with
        the slots a sliding layer reads) and the rotary rows of the positions."""
        g, cfg, T, length, input_pos = self.g, self.cfg, self.max_len, self.length, self.input_pos
        self.start = g.op(Op.PAD, [self.slice(input_pos, [0], [1]), g.const([[2, 1]])], [4], I32, fb.PadOptionsT())
        q_pos = g.reshape(input_pos, [length, 1])
        out = {}
        for kind in layer_types:
            k_pos, span, slots = g.const(np.arange(T, dtype=I32)[None, :]), T, None
            if kind == SLIDING and cfg.sliding_window + length - 1 < T:
                # Sliding layers read only the slots their window can reach: `span` from `first` (clamped into
                # the cache), gathered; a full-length read made the 2048-slot cache most of decode's traffic.
                span = cfg.sliding_window + length - 1
                first = self.binary(Op.SUB, self.slice(input_pos, [0], [1]), g.const([span - length], I32), I32)
                first = g.op(Op.MAXIMUM, [first, g.const([0], I32)], [1], I32, fb.MaximumMinimumOptionsT())
                first = g.op(Op.MINIMUM, [first, g.const([T - span], I32)], [1], I32, fb.MaximumMinimumOptionsT())
                slots = self.binary(Op.ADD, first, g.const(np.arange(span, dtype=I32)), I32)
                k_pos = g.reshape(slots, [1, span])
            allowed = g.op(Op.LESS_EQUAL, [k_pos, q_pos], [length, span], np.bool_, fb.LessEqualOptionsT())
            if kind == SLIDING:
                lo = self.binary(Op.SUB, q_pos, g.const([cfg.sliding_window]), I32)
                inside = g.op(Op.GREATER, [k_pos, lo], [length, span], np.bool_, fb.GreaterOptionsT())
                allowed = g.op(Op.LOGICAL_AND, [allowed, inside], [length, span], np.bool_, fb.LogicalAndOptionsT())
            neg = [g.const([0.0], F32), g.const([_NEG], F32)]
            mask = g.op(Op.SELECT_V2, [allowed, *neg], [length, span], F32, fb.SelectV2OptionsT())
            cos, sin = self.rope_tables(kind)
            rope = tuple(g.reshape(self.gather_rows(t, input_pos), [length, 1, cfg.head_dim]) for t in (cos, sin))
            out[kind] = (mask, slots, rope)
        return out

    def norm(self, x: int, weight: str) -> int:
        g = self.g
        options = fb.ReducerOptionsT()
        options.keepDims = True
        sq = self.binary(Op.MUL, x, x)
        var = g.op(Op.MEAN, [sq, g.const([-1])], (*g.shape(x)[:-1], 1), F32, options)
        inv = self.unary(Op.RSQRT, self.binary(Op.ADD, var, g.const([self.cfg.rms_norm_eps], F32)))
        return self.binary(Op.MUL, self.binary(Op.MUL, x, inv), self.vector(weight))

    def linear(self, x: int, name: str, bias: bool = False) -> int:
        """x [..., K] @ W[N, K]ᵀ (+ b): FULLY_CONNECTED keeping x's leading dims."""
        g = self.g
        w = self.fc_weights.tensor(g, name + ".weight")
        b = self.vector(name + ".bias") if bias else -1
        n = g.shape(w)[0]
        options = fb.FullyConnectedOptionsT()
        options.keepNumDims = True
        y = g.op(Op.FULLY_CONNECTED, [x, w, b], (*g.shape(x)[:-1], n), F32, options)
        c = self.fc_weights.correction(name + ".weight")
        if name in self.slots:  # a LoRA slot: + (x @ A) @ B, A [in, r] and B [r, out] inputs of the signature
            y = self.binary(Op.ADD, y, self.lora(x, name))
        if c is None:
            return y
        # a carried Q4_K weight's float zero points: + (x summed over each block) @ Cᵀ, C [N, n_blocks]
        lead, k, n_blocks = g.shape(x)[:-1], g.shape(x)[-1], g.shape(c)[1]
        blocks = g.reshape(x, [*lead, n_blocks, k // n_blocks])
        sums = g.op(Op.SUM, [blocks, g.const([-1])], [*lead, n_blocks], F32, fb.ReducerOptionsT())
        return self.binary(Op.ADD, y, g.op(Op.FULLY_CONNECTED, [sums, c, -1], (*lead, n), F32, options))

    def lora(self, x: int, module: str) -> int:
        g, (k, n), r = self.g, self.slots[module], self.rank
        a = g.input(slot_name(module, "A"), [k, r], F32)
        b = g.input(slot_name(module, "B"), [r, n], F32)
        sm = self.smoothing  # a smoothed projection: the branch sees the input and writes the output as they were
        if sm is not None and sm.input_factor(module) is not None:
            x = self.binary(Op.MUL, x, self._factor(module, "lora_input_factor", k, lambda: sm.input_factor(module)))
        lead = g.shape(x)[:-1]
        xa = g.op(Op.BATCH_MATMUL, [g.reshape(x, [math.prod(lead), k]), a], [math.prod(lead), r], F32,
                  fb.BatchMatMulOptionsT())  # fmt: skip
        out = g.reshape(g.op(Op.BATCH_MATMUL, [xa, b], [math.prod(lead), n], F32, fb.BatchMatMulOptionsT()), [*lead, n])
        if sm is not None and sm.output_divisor(module) is not None:
            out = self.binary(Op.MUL, out, self._factor(module, "lora_output_factor", n,
                                                        lambda: 1 / sm.output_divisor(module)))  # fmt: skip
        return out

    def _factor(self, module: str, what: str, size: int, values) -> int:
        return self.g.weight(f"{module}.{what}", (size,), F32, 4 * size, lambda: np.asarray(values(), dtype=F32))

    def heads(self, x: int, n: int) -> int:
        return self.g.reshape(x, [self.length, n, self.cfg.head_dim])

    def rope(self, x: int, positions) -> int:
        g = self.g
        cos, sin = positions[2]
        length, n, d = g.shape(x)
        rd = self.cfg.rotary_dims
        half = rd // 2
        x1 = self.slice(x, [0, 0, 0], [length, n, half])
        x2 = self.slice(x, [0, 0, half], [length, n, half])
        concat = fb.ConcatenationOptionsT()
        concat.axis = 2
        parts = [self.unary(Op.NEG, x2), x1]
        if rd < d:  # partial rotary: the passing dims ride along (the tables hold cos 1 and sin 0 for them)
            parts.append(self.slice(x, [0, 0, rd], [length, n, d - rd]))
        rotated = g.op(Op.CONCATENATION, parts, [length, n, d], F32, concat)
        return self.binary(Op.ADD, self.binary(Op.MUL, x, cos), self.binary(Op.MUL, rotated, sin))

    def attention(self, i: int, q: int, k: int, v: int, positions) -> int:
        g, cfg = self.g, self.cfg
        length, T, d = self.length, self.max_len, cfg.head_dim
        kvh, groups = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        updated = []
        for new, cache, kind in ((k, self.caches[2 * i], "k"), (v, self.caches[2 * i + 1], "v")):
            new = g.reshape(self.transpose(new, [1, 0, 2]), [1, kvh, length, d])
            if self.kv_dtype != F32:  # a float16 cache: the new rows cast down, the rows read cast up
                new = g.op(Op.CAST, [new], g.shape(new), self.kv_dtype)
            out = g.tensor(f"kv_cache_{kind}_{i}", [1, kvh, T, d], self.kv_dtype)
            g.op_into(Op.DYNAMIC_UPDATE_SLICE, [cache, new, self.start], [out])
            updated.append(out)
        g.output(f"kv_cache_k_{i}", updated[0])
        g.output(f"kv_cache_v_{i}", updated[1])
        keys, values = (g.reshape(c, [kvh, T, d]) for c in updated)
        mask, slots, _ = positions
        if slots is not None:  # a sliding layer's reachable slots only
            gather = fb.GatherOptionsT()
            gather.axis = 1
            span = g.shape(slots)[0]
            keys, values = (g.op(Op.GATHER, [c, slots], [kvh, span, d], self.kv_dtype, gather) for c in (keys, values))
        T = g.shape(keys)[1]
        if self.kv_dtype != F32:
            keys, values = (g.op(Op.CAST, [c], g.shape(c), F32) for c in (keys, values))

        q = g.reshape(self.transpose(q, [1, 0, 2]), [kvh, groups * length, d])
        bmm = fb.BatchMatMulOptionsT()
        bmm.adjY = True
        scores = g.op(Op.BATCH_MATMUL, [q, keys], [kvh, groups * length, T], F32, bmm)
        scores = self.binary(Op.MUL, scores, g.const([cfg.attn_scale], F32))
        if cfg.attn_logit_softcapping:
            scores = self.softcap(scores, cfg.attn_logit_softcapping)
        scores = self.binary(Op.ADD, g.reshape(scores, [kvh, groups, length, T]), mask)
        softmax = fb.SoftmaxOptionsT()
        softmax.beta = 1.0
        probs = g.reshape(g.op(Op.SOFTMAX, [scores], g.shape(scores), F32, softmax), [kvh, groups * length, T])
        out = g.op(Op.BATCH_MATMUL, [probs, values], [kvh, groups * length, d], F32, fb.BatchMatMulOptionsT())
        out = self.transpose(g.reshape(out, [cfg.num_heads, length, d]), [1, 0, 2])
        return g.reshape(out, [1, length, cfg.q_size])

    def add(self, a: int, b: int) -> int:
        return self.binary(Op.ADD, a, b)

    def mul(self, a: int, b: int) -> int:
        return self.binary(Op.MUL, a, b)

    def activation(self, x: int, kind: str) -> int:
        if kind == "silu":
            return self.binary(Op.MUL, x, self.unary(Op.LOGISTIC, x))
        options = fb.GeluOptionsT()
        options.approximate = True
        return self.g.op(Op.GELU, [x], self.g.shape(x), F32, options)

    def head(self, x: int) -> int:
        return self.fc_weights.head(self.g, x)

    def softcap(self, x: int, cap: float) -> int:
        c = self.g.const([cap], F32)
        return self.binary(Op.MUL, self.unary(Op.TANH, self.binary(Op.DIV, x, c)), c)


def build_tflite(
    model: LoadedModel,
    recipe: Recipe,
    max_len: int,
    prefill_lens: list[int],
    statistics=None,
    kv_dtype: str = "float32",
    slots: Slots | None = None,
) -> tuple[TflModel, dict]:
    """The LiteRT model of a loaded checkpoint: `prefill_<L>` for each L, then `decode` (with LoRA `slots`, each
    takes the slots' inputs too: targets/tflite/lora.py). Returns the model (weights
    still lazy: they are read, quantized and written one buffer at a time by TflModel.write) and the quantization
    report. `statistics`: calibration, for recipes that use it."""
    cfg = model.config
    if max_len > cfg.max_position_embeddings:
        max_len = cfg.max_position_embeddings
    prefill_lens = sorted({min(n, max_len) for n in prefill_lens})  # a prompt never passes the cache
    weights = FcWeights(model, recipe, statistics)
    tfl = TflModel(f"mobilize {cfg.family}")
    keys = [(f"prefill_{n}", n) for n in prefill_lens] + [("decode", 1)]
    modules = slots.modules(cfg) if slots is not None else {}
    for name, length in keys:
        g = tfl.graph(name)
        emitter = TfliteEmitter(model, weights, max_len, g, length, logits=name == "decode", kv_dtype=kv_dtype,
                                slots=modules or None, rank=slots.rank if modules else 0)
        logits = decode(cfg, emitter)
        if logits is not None:
            g.tensors[logits].name = "logits"
            g.outputs.insert(0, ("logits", logits))
    return tfl, weights.report()


def tflite_kv(cfg, max_len: int, kv_dtype: str = "float32") -> KvCache:
    return KvCache.static(
        max_len, kv_dtype, tensors="kv_cache_k_<layer> / kv_cache_v_<layer>, in and out of every signature",
        shape=[1, cfg.num_kv_heads, max_len, cfg.head_dim], update="DYNAMIC_UPDATE_SLICE at input_pos[0]",
    )  # fmt: skip
