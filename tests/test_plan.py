"""The weight planner as a table: (shape, source grid, recipe form, target) -> the form both targets store."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mobilize.quant.plan import SourceGrid, WeightForm, plan_weight, quant_for
from mobilize.quant.recipes import RECIPES, WeightQuant
from mobilize.targets.onnx.caps import ONNX_CAPS
from mobilize.targets.tflite.caps import TFLITE_CAPS

INT4 = RECIPES["int4"]
# 4-bit asym (b32; wider from floats), wider grids 8-bit b128, Q4_K under 4M widened
BODY = quant_for(INT4, "linear", ONNX_CAPS)
Q4K, Q6K = SourceGrid.of("Q4_K"), SourceGrid.of("Q6_K")
Q8 = SourceGrid.of("Q8_0", codes=True)
BIG, SMALL = (4096, 11008), (640, 2048)  # a 7B MLP weight (45M elements), a Gemma 3 270M one (1.3M)
EXACT_ONNX = replace(ONNX_CAPS, wide_block_size=0, widen_below=0)  # ONNX that keeps every grid as it is


def form(bits, block, zp, scale, source, **kw) -> WeightForm:
    return WeightForm(bits, block, zp, scale, source, **kw)


TABLE = [
    # (id, shape, grid, quant, carry, caps, statistics) -> bits, block, zero point, scale dtype, source
    ("onnx Q4_K big: exact grid", BIG, Q4K, BODY, True, ONNX_CAPS, False, (4, 32, "float", "float32", "grid")),
    ("onnx Q4_K small: widened", SMALL, Q4K, BODY, True, ONNX_CAPS, False, (8, 128, "none", "float32", "rounded")),
    ("onnx Q6_K: 8-bit b128", SMALL, Q6K, BODY, True, ONNX_CAPS, False, (8, 128, "none", "float32", "rounded")),
    # from float values, blocks widen until the form costs at most the recipe's 4.6 bits per weight
    ("onnx float: 4-bit asym b64", BIG, None, BODY, True, ONNX_CAPS, False, (4, 64, "uint8", "float32", "rounded")),
    ("tflite float: 4-bit sym b32", BIG, None, BODY, True, TFLITE_CAPS, False, (4, 32, "none", "float16", "rounded")),
    ("tflite Q4_K: exact INT4 + correction", SMALL, Q4K, BODY, True, TFLITE_CAPS, False,
     (4, 32, "float", "float16", "grid")),
    ("tflite Q6_K: int8 per channel", SMALL, Q6K, BODY, True, TFLITE_CAPS, False, (8, 0, "none", "float32", "rounded")),
    ("tflite float: symmetric INT4 blocks", BIG, None, BODY, True, TFLITE_CAPS, True,
     (4, 32, "none", "float16", "rounded")),
    ("tflite int8: per channel", BIG, None, WeightQuant(8, 32, True), False, TFLITE_CAPS, False,
     (8, 0, "none", "float32", "rounded")),
    ("onnx int8: blocks of 32", BIG, None, WeightQuant(8, 32, True), False, ONNX_CAPS, False,
     (8, 32, "none", "float32", "rounded")),
    ("onnx Q8_0 codes as they are", BIG, Q8, WeightQuant(4, 32, False), True, EXACT_ONNX, False,
     (8, 32, "uint8", "float32", "codes")),
    ("onnx Q6_K grid as it is", BIG, Q6K, WeightQuant(4, 32, False), True, EXACT_ONNX, False,
     (8, 16, "uint8", "float32", "grid")),
    ("onnx Q4_K small, exact caps", SMALL, Q4K, BODY, True, EXACT_ONNX, False, (4, 32, "float", "float32", "grid")),
    ("not carrying wider grids: re-rounded", BIG, Q8, WeightQuant(4, 32, False, carry_wider=False), True, ONNX_CAPS,
     False, (4, 32, "uint8", "float32", "rounded")),
    ("the recipe does not carry", BIG, Q4K, WeightQuant(4, 32, False), False, ONNX_CAPS, False,
     (4, 32, "uint8", "float32", "rounded")),
    ("tflite: a block that does not divide K", (64, 96), None, WeightQuant(4, 64, True), False, TFLITE_CAPS, False,
     (4, 0, "none", "float32", "rounded")),
]


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_plan_table(case):
    _, shape, grid, quant, carry, caps, statistics, (bits, block, zp, scale, source) = case
    got = plan_weight(shape, grid, quant, carry, caps, statistics)
    assert (got.bits, got.block_size, got.zero_point, got.scale_dtype, got.source) == (bits, block, zp, scale, source)
    assert got.exact == (source != "rounded")


def test_plan_says_what_it_chose_instead():
    """Where the target cannot store the recipe's form, the form's note says what it did."""
    assert "no zero points" in plan_weight(BIG, None, BODY, False, TFLITE_CAPS).note
    assert "per output channel" in plan_weight(BIG, None, WeightQuant(8, 32, True), False, TFLITE_CAPS).note
    assert "cannot hold its grid exactly" in plan_weight(SMALL, Q6K, BODY, True, TFLITE_CAPS).note
    assert plan_weight(BIG, None, None, False, ONNX_CAPS) is None  # fp32: no form


def test_head_split_needs_statistics_and_a_target_that_can():
    head = quant_for(INT4, "head", ONNX_CAPS)
    split = plan_weight((262144, 640), None, head, True, ONNX_CAPS, statistics=True)
    assert split.split is not None and split.split.keep == 256 and (split.bits, split.block_size) == (8, 128)
    # the rest: 4-bit at the recipe's 4.6 bits per weight (ONNX: asymmetric blocks of 64; TFLite: symmetric of 32)
    assert (split.split.rest.bits, split.split.rest.block_size, split.split.rest.zero_point) == (4, 64, "uint8")
    assert plan_weight((262144, 640), None, head, True, ONNX_CAPS, statistics=False).split is None
    assert plan_weight((262144, 200), None, head, True, ONNX_CAPS, statistics=True).split is None  # k <= keep
    tflite_head = quant_for(INT4, "head", TFLITE_CAPS)  # TFLite splits too: kept channels 8-bit per row, the rest
    t = plan_weight((262144, 640), None, tflite_head, True, TFLITE_CAPS, statistics=True)  # INT4 blocks, fp16 scales
    assert (t.bits, t.block_size, t.split.keep) == (8, 0, 256)
    assert (t.split.rest.bits, t.split.rest.block_size, t.split.rest.zero_point, t.split.rest.scale_dtype) == (
        4, 32, "none", "float16")  # fmt: skip
    no_stats = plan_weight((262144, 640), None, quant_for(INT4, "head", TFLITE_CAPS, False), True, TFLITE_CAPS)
    assert (no_stats.bits, no_stats.block_size, no_stats.split) == (4, 32, None)  # without calibration: plain 4-bit


def test_the_form_is_recorded_as_plain_data():
    d = plan_weight(BIG, Q4K, BODY, True, ONNX_CAPS).describe()
    assert d == {"bits": 4, "block_size": 32, "zero_point": "float", "scale_dtype": "float32", "source": "grid"}


def test_embedding_plans():
    from mobilize.quant.plan import plan_embedding

    q8 = WeightQuant(8, 32, True)
    table = (262144, 640)
    assert plan_embedding(table, Q8, q8, True, ONNX_CAPS).source == "codes"
    assert plan_embedding(table, Q8, q8, True, TFLITE_CAPS).source == "codes"  # rows and per-block scales
    assert plan_embedding(table, Q8, q8, False, ONNX_CAPS).source == "rounded"
    onnx, tflite = plan_embedding(table, None, q8, True, ONNX_CAPS), plan_embedding(table, None, q8, True, TFLITE_CAPS)
    assert (onnx.bits, onnx.block_size) == (8, 32) and (tflite.bits, tflite.block_size) == (8, 0)
    assert "one scale per row" in tflite.note
    assert plan_embedding(table, None, None, True, ONNX_CAPS) is None


def test_recipes_name_no_target():
    """A recipe is target-free data: which targets search scales and which can take it at all follow from each
    target's caps, as the driver and both targets ask (`searches_scales`, `unavailable`)."""
    from mobilize.quant.plan import searches_scales, unavailable
    from mobilize.quant.recipes import CALIBRATE

    for recipe in RECIPES.values():
        assert recipe.calibrate in CALIBRATE, recipe.name
    # int4 searches where its blocks are stored without zero points: TFLite (none), not ONNX (uint8 zero points)
    assert searches_scales(INT4, TFLITE_CAPS) and not searches_scales(INT4, ONNX_CAPS)
    assert all(searches_scales(RECIPES["int4-all-cal"], caps) for caps in (ONNX_CAPS, TFLITE_CAPS))
    assert not any(searches_scales(RECIPES["int8"], caps) for caps in (ONNX_CAPS, TFLITE_CAPS))
    symmetric_onnx = replace(INT4, matmul=replace(INT4.matmul, symmetric=True))
    assert searches_scales(symmetric_onnx, ONNX_CAPS)  # a symmetric recipe has no zero points to shift either
    # one scale per output channel (block 0) exists in TFLite only: int4-channel is refused on ONNX, with why
    assert unavailable(RECIPES["int4-channel"], TFLITE_CAPS) is None
    why = unavailable(RECIPES["int4-channel"], ONNX_CAPS)
    assert why is not None and "one scale per output channel" in why and "onnx" in why
    # everything else has a form on both (the planner's substitute where a target lacks the recipe's own)
    for name, recipe in RECIPES.items():
        if name != "int4-channel":
            assert unavailable(recipe, ONNX_CAPS) is None and unavailable(recipe, TFLITE_CAPS) is None, name
