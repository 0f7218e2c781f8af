"""The decoder (model/decoder.py) recorded as a plain ONNX graph.

It emits the form a tracer would: standard ONNX ops (opset 21), fp32, nothing fused, and a KV cache that
grows with Concat: `past_key_values.{i}.key|value` in, `present.{i}.key|value` out. The ONNX passes
(targets/onnx/passes) lift this form; because it is the common form, they also work on graphs from
torch.onnx or optimum. Weights stay lazy (onnx_ir.LazyTensor) until the graph is saved.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from mobilize.frontend.config import SLIDING, is_norm
from mobilize.frontend.loader import LoadedModel
from mobilize.frontend.lora import Slots, slot_inputs
from mobilize.frontend.sources.base import TensorRef
from mobilize.frontend.sources.gguf_grid import GRID_FORMS, GRID_KINDS, block_codes, block_grid
from mobilize.model.decoder import decode
from mobilize.model.weights import norm_weight

OPSET = 21
FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64
_NEG = float(np.finfo(np.float32).min)


class OnnxEmitter:
    """The decoder's calls as ONNX nodes on a tape; `build` wraps them in a model."""

    wants_logits = True

    def __init__(self, model: LoadedModel, last_logits: bool = False, slots: Slots | None = None) -> None:
        self.cfg = model.config
        self.slots = slots.modules(model.config) if slots else {}
        self.lora_inputs: list[ir.Value] = []
        self.last_logits = last_logits
        self.weights = model.weights
        self.t = Tape()
        self._consts: dict[tuple, ir.Value] = {}
        self._initializers: dict[str, ir.Value] = {}  # a tied weight is one initializer, used twice
        cfg = self.cfg
        self.input_ids = ir.Value(name="input_ids", type=ir.TensorType(INT64), shape=ir.Shape(["batch", "seq"]))
        self.attention_mask = ir.Value(
            name="attention_mask", type=ir.TensorType(INT64), shape=ir.Shape(["batch", "total_seq"])
        )
        self.position_ids = ir.Value(name="position_ids", type=ir.TensorType(INT64), shape=ir.Shape(["batch", "seq"]))
        kv_shape = ir.Shape(["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim])
        self.pasts = [
            (
                ir.Value(name=f"past_key_values.{i}.key", type=ir.TensorType(FLOAT), shape=kv_shape),
                ir.Value(name=f"past_key_values.{i}.value", type=ir.TensorType(FLOAT), shape=kv_shape),
            )
            for i in range(cfg.num_layers)
        ]
        self.presents: list[ir.Value] = []

    # ---- small helpers ----
    def op(self, op_type: str, *inputs: ir.Value | None, **attrs) -> ir.Value:
        return self.t.op(op_type, list(inputs), attrs or None)

    def const(self, value, dtype=np.int64) -> ir.Value:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.t.initializer(ir.tensor(arr), name=f"const_{len(self._consts)}")
        return self._consts[key]

    def weight(self, name: str, transpose: bool = False) -> ir.Value:
        """A checkpoint tensor as a lazy fp32 initializer ([in, out] when `transpose`, for MatMul)."""
        if name in self._initializers:
            return self._initializers[name]
        ref = self.weights[name]
        shape = ref.shape[::-1] if transpose else ref.shape
        plus_one = self.cfg.norm_plus_one and is_norm(name)
        tensor = ir.LazyTensor(_materialize(self.cfg, name, ref, transpose), FLOAT, ir.Shape(shape), name=name)
        value = self.t.initializer(tensor, name=name)
        if ref.dtype in GRID_KINDS and not plus_one:
            # The source's block format; with its raw blocks, quantize passes may carry them over exactly instead of
            # re-rounding (without: a merged LoRA's weight, re-rounded at the precision its source had)
            value.meta["block_form"] = GRID_FORMS[ref.dtype]
            value.meta["block_kinds"] = (ref.dtype,)
        if ref.raw is not None and ref.dtype in GRID_KINDS and not plus_one:
            value.meta["block_grid"] = _grid(ref)
            if ref.dtype == "Q8_0":  # codes readable without dequantizing: no fp32 copy at all
                # computed once: a tied table's embedding and head read the same codes
                value.meta["block_codes"] = functools.cache(lambda: block_codes(ref.dtype, ref.raw()))
        self._initializers[name] = value
        return value

    def softmax_free_mask(self, kind: str) -> ir.Value:
        """Additive mask [batch, 1, 1, seq, total]: causal, padding, and the sliding window."""
        past_len = self.op("Shape", self.pasts[0][0], start=2, end=3)
        seq_len = self.op("Squeeze", self.op("Shape", self.input_ids, start=1, end=2), self.const([0]))
        total = self.op("Squeeze", self.op("Shape", self.attention_mask, start=1, end=2), self.const([0]))
        zero, one = self.const(0), self.const(1)
        q_pos = self.op("Unsqueeze", self.op("Add", self.op("Range", zero, seq_len, one), past_len), self.const([1]))
        k_pos = self.op("Unsqueeze", self.op("Range", zero, total, one), self.const([0]))
        allowed = self.op("LessOrEqual", k_pos, q_pos)  # [seq, total]
        if kind == SLIDING:
            window_start = self.op("Sub", q_pos, self.const(self.cfg.sliding_window))
            allowed = self.op("And", allowed, self.op("Greater", k_pos, window_start))
        keep = self.op("Unsqueeze", self.op("Cast", self.attention_mask, to=ir.DataType.BOOL), self.const([1]))
        allowed = self.op("And", allowed, keep)  # [batch, seq, total]
        bias = self.op("Where", allowed, self.const(0.0, np.float32), self.const(_NEG, np.float32))
        return self.op("Unsqueeze", bias, self.const([1, 2]))

    def rotary_tables(self, kind: str) -> tuple[ir.Value, ir.Value]:
        """cos and sin [batch, 1, seq, head_dim] for the positions, as transformers computes them."""
        inv_freq = self.cfg.rope_inv_freq(kind)
        pos = self.op("Unsqueeze", self.op("Cast", self.position_ids, to=FLOAT), self.const([-1]))
        freqs = self.op("Mul", pos, self.const(inv_freq, np.float32))
        emb = self.op("Concat", freqs, freqs, axis=-1)
        cos, sin = self.op("Cos", emb), self.op("Sin", emb)
        if self.cfg.rope_magnitude != 1.0:  # longrope's attention factor on cos and sin
            magnitude = self.const(self.cfg.rope_magnitude, np.float32)
            cos, sin = self.op("Mul", cos, magnitude), self.op("Mul", sin, magnitude)
        return self.op("Unsqueeze", cos, self.const([1])), self.op("Unsqueeze", sin, self.const([1]))

    # ---- the Emitter ----
    def embed(self) -> ir.Value:
        return self.op("Gather", self.weight("model.embed_tokens.weight"), self.input_ids)

    def scale(self, x: ir.Value, factor: float) -> ir.Value:
        return self.op("Mul", x, self.const(factor, np.float32))

    def positions(self, layer_types: list[str]) -> dict:
        ropes = {kind: self.rotary_tables(kind) for kind in layer_types}
        masks = {kind: self.softmax_free_mask(kind) for kind in layer_types}
        return {kind: (ropes[kind], masks[kind]) for kind in layer_types}

    def norm(self, x: ir.Value, weight: str) -> ir.Value:
        var = self.op("ReduceMean", self.op("Mul", x, x), self.const([-1]), keepdims=1)
        std = self.op("Sqrt", self.op("Add", var, self.const(self.cfg.rms_norm_eps, np.float32)))
        return self.op("Mul", self.op("Div", x, std), self.weight(weight))

    def linear(self, x: ir.Value, name: str, bias: bool = False) -> ir.Value:
        y = self.op("MatMul", x, self.weight(name + ".weight", transpose=True))
        if bias:
            y = self.op("Add", y, self.weight(name + ".bias"))
        if name in self.slots:  # a LoRA slot: + (x @ A) @ B, A and B graph inputs (empty by default: the base)
            (k, n), (a_name, b_name) = self.slots[name], slot_inputs(name)
            a = ir.Value(name=a_name, type=ir.TensorType(FLOAT), shape=ir.Shape([k, "lora_rank"]))
            b = ir.Value(name=b_name, type=ir.TensorType(FLOAT), shape=ir.Shape(["lora_rank", n]))
            self.lora_inputs += [a, b]
            y = self.op("Add", y, self.op("MatMul", self.op("MatMul", x, a), b))
        return y

    def heads(self, x: ir.Value, n: int) -> ir.Value:
        return self.op("Reshape", x, self.const([0, 0, n, self.cfg.head_dim]))  # [batch, seq, heads, head_dim]

    def rope(self, x: ir.Value, positions) -> ir.Value:
        x = self.op("Transpose", x, perm=[0, 2, 1, 3])  # [batch, heads, seq, head_dim]
        cos, sin = positions[0]
        rd, d = self.cfg.rotary_dims, self.cfg.head_dim
        whole = x
        if rd < d:  # partial rotary: the first rd dims rotate, the rest pass (FuseAttentionPass reads this form)
            x = self.op("Slice", whole, self.const([0]), self.const([rd]), self.const([-1]))
        half = rd // 2
        x1 = self.op("Slice", x, self.const([0]), self.const([half]), self.const([-1]))
        x2 = self.op("Slice", x, self.const([half]), self.const([2 * half]), self.const([-1]))
        rotated = self.op("Concat", self.op("Neg", x2), x1, axis=-1)
        y = self.op("Add", self.op("Mul", x, cos), self.op("Mul", rotated, sin))
        if rd < d:
            passing = self.op("Slice", whole, self.const([rd]), self.const([d]), self.const([-1]))
            y = self.op("Concat", y, passing, axis=-1)
        return y

    def attention(self, i: int, q: ir.Value, k: ir.Value, v: ir.Value, positions) -> ir.Value:
        cfg, past, bias = self.cfg, self.pasts[i], positions[1]
        groups = cfg.num_heads // cfg.num_kv_heads
        v = self.op("Transpose", v, perm=[0, 2, 1, 3])
        key = self.op("Concat", past[0], k, axis=2)
        value = self.op("Concat", past[1], v, axis=2)
        key.name, value.name = f"present.{i}.key", f"present.{i}.value"
        kv_shape = ir.Shape(["batch", cfg.num_kv_heads, "total_seq", cfg.head_dim])
        for val in (key, value):
            val.type, val.shape = ir.TensorType(FLOAT), kv_shape
        self.presents += [key, value]

        # Grouped-query attention without copying the cache: queries as [b, kv_heads, groups, s, d]
        # broadcast against keys as [b, kv_heads, 1, t, d].
        q5 = self.op("Reshape", q, self.const([0, cfg.num_kv_heads, groups, -1, cfg.head_dim]))
        k5 = self.op("Unsqueeze", key, self.const([2]))
        v5 = self.op("Unsqueeze", value, self.const([2]))
        scores = self.op("MatMul", q5, self.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))
        scores = self.op("Mul", scores, self.const(cfg.attn_scale, np.float32))
        if cfg.attn_logit_softcapping:
            scores = self.softcap(scores, cfg.attn_logit_softcapping)
        probs = self.op("Softmax", self.op("Add", scores, bias), axis=-1)
        out = self.op("MatMul", probs, v5)  # [b, kv_heads, groups, s, d]
        out = self.op("Reshape", out, self.const([0, cfg.num_heads, -1, cfg.head_dim]))
        return self.op("Reshape", self.op("Transpose", out, perm=[0, 2, 1, 3]), self.const([0, 0, cfg.q_size]))

    def add(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.op("Add", a, b)

    def mul(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.op("Mul", a, b)

    def activation(self, x: ir.Value, kind: str) -> ir.Value:
        if kind == "silu":
            return self.op("Mul", x, self.op("Sigmoid", x))
        return self.op("Gelu", x, approximate="tanh")

    def head(self, x: ir.Value) -> ir.Value:
        if self.last_logits:  # the head on the last position only: a prompt's logits cost one token's
            end = np.iinfo(np.int64).max
            x = self.op("Slice", x, self.const([-1]), self.const([end]), self.const([1]))
        if self.cfg.tie_word_embeddings:
            table = self.op("Transpose", self.weight("model.embed_tokens.weight"), perm=[1, 0])
            return self.op("MatMul", x, table)
        return self.linear(x, "lm_head")

    def softcap(self, x: ir.Value, cap: float) -> ir.Value:
        c = self.const(cap, np.float32)
        return self.op("Mul", self.op("Tanh", self.op("Div", x, c)), c)

    # ---- the model ----
    def build(self) -> ir.Model:
        cfg = self.cfg
        logits = decode(cfg, self)
        logits.name = "logits"
        positions = 1 if self.last_logits else "seq"
        logits.type, logits.shape = ir.TensorType(FLOAT), ir.Shape(["batch", positions, cfg.vocab_size])
        inputs = [self.input_ids, self.attention_mask, self.position_ids] + [v for pair in self.pasts for v in pair]
        inputs += self.lora_inputs
        graph = ir.Graph(
            inputs,
            [logits, *self.presents],
            nodes=self.t.nodes,
            initializers=self.t.initializers,
            opset_imports={"": OPSET},
            name=f"mobilize_{cfg.family}",
        )
        return ir.Model(graph, ir_version=10, producer_name="mobilize")


def _materialize(cfg, name: str, ref: TensorRef, transpose: bool):
    def load() -> ir.Tensor:
        w = norm_weight(cfg, name, np.asarray(ref.load(), dtype=np.float32))
        if transpose:
            w = w.T
        return ir.Tensor(np.ascontiguousarray(w))

    return load


def _grid(ref: TensorRef):
    return lambda: block_grid(ref.dtype, ref.raw())


def build_decoder(model: LoadedModel, last_logits: bool = False, slots: Slots | None = None) -> ir.Model:
    """The plain fp32 ONNX decoder of a loaded checkpoint (weights still lazy). `last_logits`: the logits
    output is the last position's only ([batch, 1, vocab]), what generation reads; else every position's.
    `slots`: LoRA slots on the projections they name (their A and B are graph inputs)."""
    return OnnxEmitter(model, last_logits, slots).build()


def empty_lora_defaults(model: ir.Model) -> None:
    """Give every LoRA slot input an empty default ([in, 0] and [0, out]), so that a run without an adapter is
    the base model. Done after the passes: a default makes an input look constant, and no pass may fold, pack,
    quantize or deduplicate these."""
    for value in model.graph.inputs:
        if value.name.endswith((".lora_A", ".lora_B")):
            k, n = value.shape
            shape = (k, 0) if value.name.endswith(".lora_A") else (0, n)
            value.const_value = ir.tensor(np.zeros(shape, np.float32), name=value.name)
            model.graph.register_initializer(value)
