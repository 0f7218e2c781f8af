"""Activation smoothing, for targets whose kernels quantize each row of activations to int8.

LiteRT's (XNNPACK's) kernels for int8 and int4 weights quantize their float input on the fly, one scale and zero
point per row (per token), over all of its channels. A model whose activations run a few channels at 30-100x the
median (Gemma's do) then gives the quiet channels a handful of levels. On gemma3-270m that rounding, not the weights',
was most of the TFLite package's error: with every weight kept exactly, per-row int8 inputs alone cost a mean KL of
0.014 on river.txt, the 8-bit weights 0.003 (a numpy simulation of both: docs/accuracy.md).

The cure is SmoothQuant's (Xiao et al., 2022): divide each input channel c of a linear layer by a factor s_c and
multiply the weight's column c by it. The product is unchanged in exact arithmetic; the loud channels come down
toward the others, and the weights take up what they can hold. The division is folded where it costs nothing:
- into the norm before q/k/v and before gate/up (its scale divided by s);
- into v_proj's rows for o_proj's input (attention is linear in v: one factor per v channel, shared by the query
  heads that read that kv head);
- into up_proj's rows for down_proj's input (act(gate) * up is linear in up).

s_c = rms_c ** alpha / max|W[:, c]| ** (1 - alpha), with rms from calibration (quant/calibrate.py) and alpha 0.5,
chosen on the accuracy set's dev split only (river + Artistic licence, 1,024 tokens; simulated with 8-bit weights
per output channel and per-row int8 inputs: mean KL 0.0114 at 0.3, 0.0051 at 0.5, 0.0068 at 0.7, 0.0177 without).

A smoothed weight is no longer on its source's grid (it is re-rounded at the precision its type allowed, like a weight
with a LoRA merged: quant/plan.py), so a group that touches a weight the target carries exactly (TFLite's Q4_K) is
left alone: the bytes stay the source's, at a little accuracy (docs/accuracy.md). LoRA slots on a smoothed projection
see the smoothed input and write a smoothed output; the emitter puts the factors back on their branch
(`input_factor`, `output_divisor`), so an adapter file is the same for any base.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.frontend.loader import LoadedModel
from mobilize.model.weights import norm_weight, stored_norm_weight

ALPHA = 0.5
F32 = np.float32
ALTERED = "its input channels smoothed"  # what a smoothed weight's plan says happened to its source grid


# Each group: the weights whose input it divides, and the one whose rows take the division (None: a norm does)
GROUPS = {
    "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), None),
    "mlp": (("mlp.gate_proj", "mlp.up_proj"), None),
    "o": (("self_attn.o_proj",), "self_attn.v_proj"),
    "down": (("mlp.down_proj",), "mlp.up_proj"),
}


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """The factors of a smoothed model, per layer, computed on first use (one layer's weights read at a time)."""

    alpha: float
    factors: Callable[[int], dict[str, np.ndarray]]  # layer -> {group: factors} of its smoothed groups
    active: Callable[[int, str], bool]  # whether a layer's group is smoothed
    num_layers: int
    groups: int  # query heads per kv head
    head_dim: int
    left: int  # groups left alone: they touch a weight the target keeps on its source grid

    def input_factor(self, module: str) -> np.ndarray | None:
        """s of a projection's input channels (its input arrives divided by s), None where not smoothed."""
        layer, short = _module(module)
        group = next(g for g, (inputs, _) in GROUPS.items() if short in inputs)
        if not self.active(layer, group):
            return None
        f = self.factors(layer)[group]
        return _per_query_head(f, self.groups, self.head_dim) if group == "o" else f

    def output_divisor(self, module: str) -> np.ndarray | None:
        """t of a projection's output rows (its output is written divided by t), None where they are not."""
        layer, short = _module(module)
        group = next((g for g, (_, rows) in GROUPS.items() if rows == short), None)
        return None if group is None or not self.active(layer, group) else self.factors(layer)[group]

    def record(self) -> dict:
        return {"alpha": self.alpha, "layers": self.num_layers, "groups_left_on_their_grid": self.left,
                "folded": "q/k/v and gate/up inputs into their norms; o_proj's into v_proj's rows; down_proj's into "
                          "up_proj's rows",
                "why": "the target's kernels quantize each row of activations to int8 (quant/smooth.py)"}  # fmt: skip


def smooth(model: LoadedModel, statistics: Mapping[str, np.ndarray], alpha: float = ALPHA,
           carried: frozenset[str] | set[str] = frozenset(), measured_on: LoadedModel | None = None):  # fmt: skip
    """(the model with smoothed weights, still lazy; its statistics as the smoothed weights see them; the Smoothing).
    `carried`: weights the target keeps exactly on their source's grid; a group touching one is left as it is.
    `measured_on`: the model whose weights' column maxima set the factors (a LoRA's base: the merged package's
    factors, and so its norms, are the base package's; any factors keep the product exact)."""
    cfg, weights = model.config, model.weights
    measured_weights = (measured_on or model).weights
    groups = cfg.num_heads // cfg.num_kv_heads

    def touched(i: int, group: str) -> list[str]:
        inputs, rows = GROUPS[group]
        return [f"model.layers.{i}.{m}.weight" for m in (*inputs, *([rows] if rows else []))]

    def measured(i: int, group: str) -> bool:  # calibration saw the group's input (finite everywhere)
        ms = statistics.get(f"model.layers.{i}.{GROUPS[group][0][0]}.weight")
        if ms is not None and not np.isfinite(ms).all():
            raise MobilizeError(f"calibration gave non-finite activations at layer {i} (the model overflows on its "
                                "text in float32): cannot smooth its inputs")  # fmt: skip
        return ms is not None

    active = {(i, g): measured(i, g) and not any(w in carried for w in touched(i, g))
              for i in range(cfg.num_layers) for g in GROUPS}  # fmt: skip

    @functools.cache
    def factors(i: int) -> dict[str, np.ndarray]:
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        load = lambda name: measured_weights[name].load()  # noqa: E731
        out = {}
        if active[i, "qkv"]:
            out["qkv"] = _factor(statistics[a + "q_proj.weight"], [load(a + p + "_proj.weight") for p in "qkv"], alpha)
        if active[i, "mlp"]:
            out["mlp"] = _factor(statistics[m + "gate_proj.weight"],
                                 [load(m + p + "_proj.weight") for p in ("gate", "up")], alpha)  # fmt: skip
        if active[i, "down"]:
            out["down"] = _factor(statistics[m + "down_proj.weight"], [load(m + "down_proj.weight")], alpha)
        if active[i, "o"]:
            # o_proj's input channel h * d + c is v's channel (h // groups) * d + c: one factor per v channel, from
            # the loudest of the query heads that share it
            d = cfg.head_dim
            ms = statistics[a + "o_proj.weight"].reshape(cfg.num_kv_heads, groups, d).max(axis=1).reshape(-1)
            w = np.abs(load(a + "o_proj.weight")).reshape(-1, cfg.num_kv_heads, groups, d).max(axis=(0, 2))
            out["o"] = _from_maxima(np.sqrt(ms), w.reshape(-1), alpha)
        return out

    left = sum(not v for v in active.values())
    sm = Smoothing(alpha, factors, lambda i, g: active[i, g], cfg.num_layers, groups, cfg.head_dim, left)
    out = dict(weights)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        mlp_norm = p + ("pre_feedforward_layernorm.weight" if cfg.sandwich_norm else "post_attention_layernorm.weight")
        for norm, group in ((p + "input_layernorm.weight", "qkv"), (mlp_norm, "mlp")):
            if active[i, group]:
                out[norm] = _altered(weights[norm], lambda w, n=norm, i=i, g=group: stored_norm_weight(
                    cfg, n, norm_weight(cfg, n, w) / factors(i)[g]))  # fmt: skip
        for name in {w for g in GROUPS if active[i, g] for w in touched(i, g)}:  # (v and up: maybe two groups)
            module = name.removesuffix(".weight")
            out[name] = _altered(weights[name], functools.partial(_weight, sm, module))
        for group, (_, rows) in GROUPS.items():
            bias = f"{p}{rows}.bias"
            if rows and active[i, group] and bias in weights:  # rows divided: their bias too
                out[bias] = _altered(weights[bias], lambda b, m=p + rows: b / sm.output_divisor(m))
    return dataclasses.replace(model, weights=out), SmoothedStatistics(statistics, sm), sm


def _weight(sm: Smoothing, module: str, w: np.ndarray) -> np.ndarray:
    s, t = sm.input_factor(module), sm.output_divisor(module)
    w = w if s is None else w * s[None, :]
    return w if t is None else w / t[:, None]


def _altered(ref, change: Callable[[np.ndarray], np.ndarray]):
    def load() -> np.ndarray:
        return np.ascontiguousarray(change(ref.load().astype(F32)), dtype=F32)

    return dataclasses.replace(ref, load=load, raw=None, altered=" and ".join(filter(None, (ref.altered, ALTERED))))


def _factor(mean_square: np.ndarray, consumers: list[np.ndarray], alpha: float) -> np.ndarray:
    w = np.max([np.abs(c).max(axis=0) for c in consumers], axis=0)
    return _from_maxima(np.sqrt(mean_square), w, alpha)


def _from_maxima(x: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's factor per channel, its geometric mean 1 (silent channels and zero columns kept finite)."""
    x = np.maximum(x.astype(np.float64), max(float(x.max()), 1e-30) * 1e-4)
    w = np.maximum(w.astype(np.float64), max(float(w.max()), 1e-30) * 1e-4)
    s = x**alpha / w ** (1 - alpha)
    return (s / np.exp(np.log(s).mean())).astype(F32)


def _per_query_head(per_v: np.ndarray, groups: int, head_dim: int) -> np.ndarray:
    """A factor per v channel [kv_heads * d] as one per o_proj input channel [heads * d]."""
    return np.repeat(per_v.reshape(-1, 1, head_dim), groups, axis=1).reshape(-1)


def _module(module: str) -> tuple[int, str]:
    parts = module.split(".")  # model.layers.<i>.<self_attn|mlp>.<projection>
    return int(parts[2]), ".".join(parts[3:])


class SmoothedStatistics(Mapping):
    """Calibration's mean squares as the smoothed weights see their inputs (divided by s squared), per weight on
    first use; the head's and any other weight's as they were."""

    def __init__(self, statistics: Mapping[str, np.ndarray], sm: Smoothing) -> None:
        self.base, self.sm, self.seen = statistics, sm, {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.seen:
            ms = self.base[key]
            s = self.sm.input_factor(key.removesuffix(".weight")) if key.startswith("model.layers.") else None
            self.seen[key] = ms if s is None else (ms / (s.astype(np.float64) ** 2)).astype(ms.dtype)
        return self.seen[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)
