"""The weight planner: how each weight is stored, decided once per weight, before any of its bytes are read.

`plan_weight` is a pure function of (the weight's shape and source grid, the recipe's form for its role, the
target's capabilities, whether calibration statistics exist) to a typed `WeightForm`. Both targets call it (the
ONNX quantize pass and the TFLite weight writer) and store exactly what it says; the form goes into the
manifest's build report tensor by tensor. Where a target cannot store what the recipe asks, its `TargetCaps` say
so and the form's `note` says what was chosen instead. Each target's capabilities live in its own folder
(targets/<format>/caps.py) and are passed in: this phase knows no target.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mobilize.frontend.sources.gguf_grid import GRID_FORMS
from mobilize.quant.recipes import Recipe, WeightQuant


@dataclasses.dataclass(frozen=True)
class SourceGrid:
    """A source tensor's own block format (a GGUF's), as far as the planner needs it."""

    kinds: tuple[str, ...]  # ggml types (Q8_0, Q5_0, Q6_K, Q4_K): several for weights packed together
    bits: int  # the grid's code width
    block_size: int
    exact: bool = True  # its grid can be read (block_grid): the values are known to lie on it
    codes: bool = False  # 8-bit codes readable straight from the bytes (Q8_0, not packed with other tensors)
    altered: str = ""  # off the grid: what moved the values (a LoRA merged, input channels smoothed)

    @classmethod
    def of(cls, kind: str, exact: bool = True, codes: bool = False, altered: str = "") -> SourceGrid | None:
        """The grid of one ggml type (None for types without one: F32, F16, Q4_0, ...)."""
        if kind not in GRID_FORMS:
            return None
        return cls((kind,), *GRID_FORMS[kind], exact=exact, codes=codes, altered=altered)

    @classmethod
    def of_ref(cls, ref, codes: bool = False) -> SourceGrid | None:
        """The grid of a checkpoint tensor: exact while its raw blocks are there (`codes`: a Q8_0's are read as
        they are, where the caller can)."""
        exact = ref.raw is not None
        return cls.of(ref.dtype, exact=exact, codes=codes and ref.dtype == "Q8_0" and exact, altered=ref.altered)

    @property
    def kind(self) -> str:
        return "+".join(self.kinds)

    def held_exactly_by(self, caps: TargetCaps) -> bool:
        return self.exact and all(k in caps.exact_grids for k in self.kinds)


@dataclasses.dataclass(frozen=True)
class WeightForm:
    """How one weight is stored."""

    bits: int  # 4 or 8
    block_size: int  # along the input axis; 0: one scale per output channel
    zero_point: str  # "none" (symmetric), "uint8" (a code per block), "float" (a float per block: Q4_K, exactly)
    scale_dtype: str  # "float32" or "float16"
    source: str  # "rounded" (re-rounded from the values), "grid" (the source's grid kept), "codes" (its codes)
    calibrated: bool = False  # re-rounding weighs each input channel's error by calibration statistics
    split: Split | None = None  # input channels parted by calibration, two forms
    note: str = ""  # why the recipe's own form was not taken
    declined: bool = False  # the recipe asked to carry the source's grid; it is re-rounded instead (see `note`)

    @property
    def exact(self) -> bool:
        return self.source != "rounded"

    def nbytes(self, n: int, k: int) -> int:
        """Bytes of a [n, k] weight in this form (codes, scales, zero points; a split's two parts)."""
        if self.split is not None:
            keep = self.split.keep
            own = dataclasses.replace(self, split=None)
            return own.nbytes(n, keep) + self.split.rest.nbytes(n, k - keep)
        return -(-int(n * k * bits_per_weight(self.bits, self.block_size or k, self.zero_point, self.scale_dtype)) // 8)

    def describe(self) -> dict[str, Any]:
        """The manifest's record of the form."""
        out = dataclasses.asdict(self)
        out["split"] = None if self.split is None else {"keep": self.split.keep, "rest": self.split.rest.describe()}
        return {k: v for k, v in out.items() if v not in (None, "", False) or k in ("bits", "block_size")}


@dataclasses.dataclass(frozen=True)
class Split:
    keep: int  # input channels of largest mean square input, kept in the weight's own form (placed first)
    rest: WeightForm  # the form of the other channels


@dataclasses.dataclass(frozen=True)
class TargetCaps:
    """What a target's kernels can store."""

    name: str
    blockwise_bits: tuple[int, ...]  # widths with a blockwise form (the others: one scale per output channel)
    integer_zero_points: bool  # a code per block (else symmetric only)
    scale_dtype: str  # of blockwise scales
    exact_grids: tuple[str, ...]  # source grids kept exactly (zero points included)
    codes: bool  # 8-bit source codes used as they are
    split: bool  # a weight parted by input channel (two matmuls and an add)
    block_must_divide: bool  # blockwise only where the block divides the input size (else per channel)
    blockwise_lookup: bool  # the embedding lookup reads blocks (else: 8-bit, one scale per row)
    # Where a recipe keeps wider source grids at 8 bits: as 8-bit symmetric blocks of this size (0: the grid exactly)
    wide_block_size: int = 0
    # ... and a 4-bit grid with float zero points (Q4_K) under this many elements likewise (its exact form's
    # correction subgraph costs more per token than its bytes save)
    widen_below: int = 0
    channel_bits: tuple[int, ...] = ()  # widths stored with one scale per output channel (a recipe's block 0)
    # its kernels quantize each row of a quantized weight's float input to int8 on the fly (one scale per token)
    row_quantized_activations: bool = False


def bits_per_weight(bits: int, block: int, zero_point: str, scale_dtype: str) -> float:
    """Storage per weight of a blockwise form: the code, its block's scale and zero point shared by `block` weights."""
    scale = 16 if scale_dtype == "float16" else 32
    zero = {"none": 0, "uint8": bits, "float": 32}[zero_point]
    return bits + (scale + zero) / block


def widest_needed(bits: int, block: int, zero_point: str, scale_dtype: str, k: int, budget: float) -> int:
    """`block` doubled (up to 256, and while it divides `k`) until the form costs at most `budget` bits per weight."""
    while bits_per_weight(bits, block, zero_point, scale_dtype) > budget + 1e-9 and block < 256 and not k % (2 * block):
        block *= 2
    return block


def head_quant(recipe: Recipe, caps: TargetCaps, statistics: bool = True) -> WeightQuant | None:
    """The recipe's own head form for a target (None: the head is stored as the other linear layers). A split head
    needs calibration to rank its channels: without statistics, the recipe's `head` (its bits per weight kept)."""
    if caps.split and recipe.split_head is not None and statistics:
        return recipe.split_head
    return recipe.head


def quant_for(recipe: Recipe, role: str, caps: TargetCaps, statistics: bool = True) -> WeightQuant | None:
    """The recipe's form for a role: "linear", "head" (lm_head or the tied embedding) or "embedding"."""
    if role == "embedding":
        return recipe.embedding
    if role == "head":
        head = head_quant(recipe, caps, statistics)
        return head if head is not None else recipe.matmul
    return recipe.matmul


def searches_scales(recipe: Recipe, caps: TargetCaps) -> bool:
    """Whether re-rounded 4-bit blocks pick their scales with calibration on this target: the recipe asks always,
    or for blocks stored without zero points (its `calibrate`: "symmetric"), which a symmetric recipe asks for and
    a target without integer zero points gives every recipe."""
    symmetric = not caps.integer_zero_points or (recipe.matmul is not None and recipe.matmul.symmetric)
    return recipe.calibrate == "always" or recipe.calibrate == "symmetric" and symmetric


def smooths(recipe: Recipe, caps: TargetCaps) -> bool:
    """Whether the linear layers' input channels are smoothed (quant/smooth.py): quantized weights on a target whose
    kernels quantize their activations per row."""
    return caps.row_quantized_activations and recipe.matmul is not None and recipe.smooth_alpha > 0


def carried_exactly(model, recipe: Recipe, caps: TargetCaps) -> set[str]:
    """The layers' linear weights this target stores on their source's own grid (a GGUF's blocks kept as they are)."""
    quant, out = recipe.matmul, set()
    for name, ref in model.weights.items():
        if ".layers." in name and len(ref.shape) == 2:
            form = plan_weight(tuple(ref.shape), SourceGrid.of_ref(ref, codes=True), quant, recipe.carry_source_blocks,
                               caps, True)  # fmt: skip
            if form is not None and form.source in ("grid", "codes"):
                out.add(name)
    return out


def needs_statistics(recipe: Recipe, caps: TargetCaps) -> bool:
    """Whether an export runs calibration: to search scales, to choose a split head's channels, or to smooth."""
    head = head_quant(recipe, caps)
    split = head is not None and head.split_rest is not None and caps.split
    return searches_scales(recipe, caps) or split or smooths(recipe, caps)


def unavailable(recipe: Recipe, caps: TargetCaps) -> str | None:
    """Why a target has no form at all for one of a recipe's weights (None: every weight has one, the planner's
    substitute where the target cannot store the recipe's own, said in the manifest). A blockwise width the target
    lacks falls back to one scale per output channel; one scale per output channel (block 0) has no substitute."""
    roles = {"linear layers": recipe.matmul, "head": recipe.head, "split head": recipe.split_head,
             "embedding": recipe.embedding}  # fmt: skip
    for role, q in roles.items():
        if q is None or q.bits in caps.channel_bits or q.block_size and q.bits in caps.blockwise_bits:
            continue
        how = "in blocks" if q.block_size else "with one scale per output channel"
        return f"its {role} are {q.bits}-bit {how}, which {caps.name} cannot store"
    return None


def plan_weight(
    shape: tuple[int, int],
    grid: SourceGrid | None,
    q: WeightQuant | None,
    carry_source_blocks: bool,
    caps: TargetCaps,
    statistics: bool = False,
) -> WeightForm | None:
    """The storage of a linear weight [out, in] (None: float). `grid`: the source's block format, if any;
    `carry_source_blocks`: the recipe's; `statistics`: calibration statistics exist for this weight."""
    if q is None:
        return None
    n, k = shape
    wants_carry = carry_source_blocks and q.carry
    g = grid if wants_carry else None

    def rounded(bits: int, block: int, symmetric: bool, note: str = "", calibrated: bool | None = None) -> WeightForm:
        fits = block and (not caps.block_must_divide or k % block == 0 < k - block)
        if bits not in caps.blockwise_bits or not fits:
            if block and not note:
                note = f"{caps.name} stores {bits}-bit weights per output channel here"
            return WeightForm(bits, 0, "none", "float32", "rounded", note=note)
        zero_point = "none" if symmetric or not caps.integer_zero_points else "uint8"
        if zero_point == "none" and not symmetric and not note:
            note = f"{caps.name} has no zero points: symmetric"
        if q.max_bits_per_weight and bits == q.bits and grid is None:  # from float values: the recipe's bits per weight
            block = widest_needed(bits, block, zero_point, caps.scale_dtype, k, q.max_bits_per_weight)
        return WeightForm(bits, block, zero_point, caps.scale_dtype, "rounded",
                          statistics if calibrated is None else calibrated, note=note)  # fmt: skip

    if g is not None and not g.exact and q.carry_wider:
        # a source type without its blocks: a weight with a LoRA merged in (or smoothed), off its grid. Stored as
        # the base stores its type where that is re-rounded anyway (the same kernel and layout: ONNX Runtime
        # quantizes a MatMulNBits input per block of the weight's, so another block size is other rounding of the
        # activations); where the base carries the grid exactly, 8 bits in the grid's blocks, asymmetric (a target
        # without 8-bit blocks: per output channel). At 4 bits the update's steps are lost: +15.5% perplexity over
        # PEFT's reference on the real adapter's domain (docs/lora.md)
        why = g.altered or "a LoRA merged"
        as_base = dataclasses.replace(g, exact=True, altered="", codes=g.kinds == ("Q8_0",))  # (as the base reads it)
        base = plan_weight(shape, as_base, q, carry_source_blocks, caps, statistics)
        if base is not None and base.source == "rounded" and base.bits == 8:
            return dataclasses.replace(base, note=f"{g.kind} with {why}: stored as its type is ({base.note})")
        form = rounded(8, g.block_size, False, "-", calibrated=False)  # (its note said below, with the form)
        how = f"8-bit blocks of {form.block_size}" if form.block_size else "8-bit per output channel"
        return dataclasses.replace(form, note=f"{g.kind} with {why}: {how}")
    if g is not None and g.bits > q.bits:  # a wider source grid (5-8 bits) under a 4-bit recipe
        if not q.carry_wider:
            note = f"source grid has {g.bits} bits: re-rounded to {q.bits}"
            form = dataclasses.replace(rounded(q.bits, q.block_size, q.symmetric, note), declined=True)
            return _with_split(form, q, k, caps, statistics)
        if caps.wide_block_size:
            return WeightForm(8, caps.wide_block_size, "none", caps.scale_dtype, "rounded",
                              note=f"{g.kind}: as 8-bit symmetric blocks of {caps.wide_block_size}")  # fmt: skip
        if not g.held_exactly_by(caps):  # kept at 8 bits, in the target's 8-bit form
            return rounded(8, 0, True, f"{g.kind} kept at 8 bits ({caps.name} cannot hold its grid exactly)",
                           calibrated=False)  # fmt: skip
    if g is not None and g.bits == 4 and q.carry_wider and caps.wide_block_size and n * k < caps.widen_below:
        return WeightForm(
            8,
            caps.wide_block_size,
            "none",
            caps.scale_dtype,
            "rounded",
            note=f"Q4_K under {caps.widen_below} elements: 8-bit (its correction would cost more)",
        )
    if g is not None and g.codes and caps.codes and (q.carry_wider or q.bits >= 8):
        return WeightForm(8, g.block_size, "uint8", "float32", "codes")
    if g is not None and g.held_exactly_by(caps):
        if g.bits == 4 and caps.block_must_divide:  # the grid's blocks as the target's blockwise 4-bit form
            if q.bits == 4 and q.block_size == g.block_size and k % g.block_size == 0 < k - g.block_size:
                return WeightForm(4, g.block_size, "float", caps.scale_dtype, "grid")
        elif g.bits <= q.bits or q.carry_wider:
            return WeightForm(g.bits, g.block_size, "float" if g.bits == 4 else "uint8", "float32", "grid")
    note = "no source block grid: re-rounded" if wants_carry else ""
    form = dataclasses.replace(rounded(q.bits, q.block_size, q.symmetric, note), declined=wants_carry)
    return _with_split(form, q, k, caps, statistics)


def plan_embedding(
    shape: tuple[int, int], grid: SourceGrid | None, q: WeightQuant | None, carry_source_blocks: bool, caps: TargetCaps
) -> WeightForm | None:
    """The storage of the embedding table [vocab, hidden], looked up by row (None: float)."""
    if q is None:
        return None
    if carry_source_blocks and q.carry and (q.bits == 8 or q.carry_wider) and grid is not None and grid.codes:
        return WeightForm(8, grid.block_size, "uint8" if caps.integer_zero_points else "none", "float32", "codes")
    if not caps.blockwise_lookup:  # one scale per row, 8-bit
        note = "" if (q.bits, q.block_size) == (8, 0) else f"{caps.name}'s lookup table is 8-bit, one scale per row"
        return WeightForm(8, 0, "none", "float32", "rounded", note=note)
    zero_point, block = "none" if q.symmetric else "uint8", q.block_size
    if q.max_bits_per_weight and grid is None:
        block = widest_needed(q.bits, block, zero_point, "float32", shape[1], q.max_bits_per_weight)
    return WeightForm(q.bits, block, zero_point, "float32", "rounded")


def _with_split(form: WeightForm, q: WeightQuant, k: int, caps: TargetCaps, statistics: bool) -> WeightForm:
    """A re-rounded weight parted by input channel, where the recipe asks, the target can and calibration ranks."""
    rest = q.split_rest
    if rest is None or not caps.split or not statistics or k <= q.split_keep:
        return form
    symmetric = rest.symmetric or not caps.integer_zero_points
    zero_point, scale_dtype = "none" if symmetric else "uint8", caps.scale_dtype if rest.block_size else "float32"
    block = rest.block_size
    if rest.max_bits_per_weight and block:
        block = widest_needed(rest.bits, block, zero_point, scale_dtype, k - q.split_keep, rest.max_bits_per_weight)
    if block and (k - q.split_keep) % block:
        return form  # the rest's blocks would not tile it
    rest_form = WeightForm(rest.bits, block, zero_point, scale_dtype, "rounded")
    return dataclasses.replace(form, calibrated=False, split=Split(q.split_keep, rest_form))


EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def estimate_weight_bytes(model, recipe: Recipe, caps: TargetCaps, statistics: bool) -> tuple[int, int]:
    """(bytes of every weight, bytes one decode step reads) of a model stored as this plan says, before any weight
    is read (`statistics`: calibration will run): each 2-D weight in its planned form, 1-D ones in float32, a tied
    head as a table of its own. An estimate (a target's packing, rotary tables and split heads' index tensors are
    not counted): the presets plan with it, and the written package is checked exactly."""
    total = per_token = 0
    for name, ref in model.weights.items():
        shape = tuple(ref.shape)
        if len(shape) != 2:
            n = 4 * math.prod(shape)
            total, per_token = total + n, per_token + n
            continue
        grid = SourceGrid.of_ref(ref, codes=True)
        if name == EMBEDDING:
            form = plan_embedding(shape, grid, recipe.embedding, recipe.carry_source_blocks, caps)
            table = 4 * math.prod(shape) if form is None else form.nbytes(*shape)
            total, per_token = total + table, per_token + table // shape[0]
            if not model.config.tie_word_embeddings:
                continue
            role = "head"
        else:
            role = "head" if name == LM_HEAD else "linear"
        quant = quant_for(recipe, role, caps, statistics)
        form = plan_weight(shape, grid, quant, recipe.carry_source_blocks, caps, statistics)
        n = 4 * math.prod(shape) if form is None else form.nbytes(*shape)
        total, per_token = total + n, per_token + n
    return total, per_token
