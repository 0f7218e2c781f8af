"""Quantization recipes: named presets, plain data. A recipe says how each kind of weight is stored."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    bits: int
    block_size: int
    symmetric: bool
    carry: bool = True  # with the recipe's carry_source_blocks: keep these weights' source blocks as they are
    carry_wider: bool = True  # ... even when the source grid has more bits than `bits`
    # ONNX only, with calibration statistics: the `split_keep` input channels of largest mean square input keep
    # this form and the rest take `split_rest`'s (rounded to nearest; the statistics choose the channels, not
    # the scales). A Gather puts the kept channels first, a Split parts them, two MatMulNBits and an Add follow.
    split_keep: int = 0
    split_rest: WeightQuant | None = None
    # Re-rounded from float values: blocks widened (x2, up to 256) until the target's form costs at most this many
    # bits per weight with its scales and zero points (0: `block_size` as it is). A target with fp16 scales and no
    # zero points keeps blocks of 32 at 4.5; one with fp32 scales and zero points takes 64.
    max_bits_per_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    matmul: WeightQuant | None  # every linear layer (and the head, unless `head` says otherwise)
    head: WeightQuant | None = None  # the output projection (lm_head, or the tied embedding)
    # the head where the target can part it by input channel (the loudest channels in this form, the rest in
    # its `split_rest`), ranked by calibration; elsewhere `head`
    split_head: WeightQuant | None = None
    embedding: WeightQuant | None = None  # the input embedding lookup
    # From a GGUF source, keep block formats that map exactly onto MatMulNBits (Q4_K -> 4-bit, Q5_0, Q6_K
    # and Q8_0 -> 8-bit) as they are, instead of re-rounding them to this recipe's grid.
    carry_source_blocks: bool = False
    # A tied embedding looked up in the head's own bytes (one table in the file) where the target can read the head's
    # form both ways (ONNX: a plain 8-bit or symmetric head; TFLite: its lookup reads INT4 blocks and int8 rows)
    share_tied_table: bool = False
    # MatMulNBits accuracy_level: 4 runs ONNX Runtime's int8-activation kernels (an order of magnitude faster
    # on CPU for 8-bit weights); 0 computes in float.
    accuracy_level: int = 4
    # Whether re-rounded 4-bit weights pick each block's scale for least error weighted by the mean square of each
    # input channel on a calibration text (quant/calibrate.py), where the source has a tokenizer: "never",
    # "symmetric" (where they are stored without zero points, whose blocks cannot shift to fit a skewed block: a
    # symmetric recipe, or a target that has none; quant/plan.py's `searches_scales`) or "always". It costs export
    # time (gemma3-270m: ~5 s forward + ~5 s search on the head).
    calibrate: str = "never"
    # Where the target's kernels quantize each row of activations to int8 (LiteRT's), divide each input channel
    # of the linear layers by a factor folded into the weights (quant/smooth.py: SmoothQuant's alpha; 0: never).
    # Needs calibration (a tokenizer); a smoothed weight leaves its source grid.
    smooth_alpha: float = 0.5


CALIBRATE = ("never", "symmetric", "always")
INT4_BPW = 4.6  # the int4 recipe's bits per weight, scales and zero points included (a float source's 7B: 3.8 GB)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("fp32", "no quantization", None),
        Recipe(
            "int8",
            "8-bit weights and embedding, blocks of 32, symmetric",
            WeightQuant(8, 32, True),
            embedding=WeightQuant(8, 32, True),
        ),
        Recipe(
            "int4",
            "4-bit weights at about 4.5 bits per weight, embedding included (blocks of 32, or wider where the "
            "target's scales cost more); a GGUF's blocks carried exactly where the target holds them, wider ones "
            "kept at 8 bits; the head split by calibration (its loudest 256 input channels 8-bit, the rest 4-bit), "
            "else 4-bit; a tied embedding looked up in the head's own bytes (one table). Each tensor's form: the "
            "manifest's build report",
            WeightQuant(4, 32, False, max_bits_per_weight=INT4_BPW),
            head=WeightQuant(4, 32, False, carry=False, max_bits_per_weight=INT4_BPW),
            split_head=WeightQuant(8, 128, True, carry=False, split_keep=256,
                                   split_rest=WeightQuant(4, 32, False, max_bits_per_weight=INT4_BPW)),  # fmt: skip
            embedding=WeightQuant(4, 32, False, max_bits_per_weight=INT4_BPW),
            carry_source_blocks=True,
            share_tied_table=True,
            calibrate="symmetric",
        ),
        Recipe(
            "int4-head8",
            "int4 with the whole head 8-bit (symmetric blocks of 128 where the target has 8-bit blocks): prefills "
            "faster, exports without a calibration pass and is a little more accurate; decodes slower (more bytes per "
            "token)",
            WeightQuant(4, 32, False),
            head=WeightQuant(8, 128, True, carry=False),
            embedding=WeightQuant(8, 32, True),
            carry_source_blocks=True,
            share_tied_table=True,
        ),
        Recipe(
            "int4-fast",
            "4-bit everywhere it is read per token: a GGUF's Q4_K blocks carried exactly, its 8-bit formats "
            "re-rounded to 4-bit, head 4-bit; the embedding 8-bit (fewer bytes per token than int4, less accurate)",
            WeightQuant(4, 32, False, carry_wider=False),
            head=WeightQuant(4, 32, False, carry=False),
            embedding=WeightQuant(8, 32, True),
            carry_source_blocks=True,
        ),
        Recipe(
            "int4-all", "4-bit weights everywhere, head included, blocks of 32, asymmetric", WeightQuant(4, 32, False)
        ),
        Recipe(
            "int4-all-cal",
            "int4-all, calibrated: each block's scale chosen for least activation-weighted error",
            WeightQuant(4, 32, False),
            calibrate="always",
        ),
        Recipe("int4-b32-sym", "4-bit weights, blocks of 32, symmetric", WeightQuant(4, 32, True)),
        Recipe(
            "int4-channel",
            "4-bit weights, one scale per output channel, symmetric (where the target stores it: TFLite)",
            WeightQuant(4, 0, True),
            embedding=WeightQuant(8, 0, True),
        ),
        Recipe("int4-b128-asym", "4-bit weights, blocks of 128, asymmetric", WeightQuant(4, 128, False)),
    ]
}
