"""Blockwise quantization: primitives by round-trip properties, the MatMulNBits pass on hand-built graphs
run in onnxruntime before and after."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobilize.quant.primitives import (
    dequantize_blockwise,
    pack_nbits,
    pack_zero_points,
    quantize_blockwise,
    unpack_nbits,
)
from mobilize.quant.recipes import WeightQuant
from mobilize.targets.onnx.caps import ONNX_CAPS
from mobilize.targets.onnx.passes.quantize import QuantizeMatMulPass


def SPLIT(keep: int) -> WeightQuant:  # noqa: N802
    """8-bit symmetric blocks of 32 for the `keep` loudest input channels, 4-bit asymmetric for the rest."""
    return WeightQuant(8, 32, True, split_keep=keep, split_rest=WeightQuant(4, 32, False))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 130),
    bits=st.sampled_from([4, 8]),
    block=st.sampled_from([16, 32, 64]),
    symmetric=st.booleans(),
    scale=st.floats(1e-4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_bound(n, k, bits, block, symmetric, scale, seed):
    w = (np.random.default_rng(seed).standard_normal((n, k)) * scale).astype(np.float32)
    q, s, zp = quantize_blockwise(w, bits, block, symmetric)
    assert q.shape == (n, -(-k // block), block) and q.max() < 2**bits
    back = dequantize_blockwise(q, s, zp, k)
    assert back.shape == w.shape
    step = np.repeat(np.abs(s), block, axis=1)[:, :k]
    # Asymmetric: half a step everywhere. Symmetric maps the largest magnitude to the most negative code,
    # so the opposite extreme can clip by up to one step (as ONNX Runtime's own quantizer does).
    bound = 1.0001 if symmetric else 0.5001
    assert (np.abs(back - w) <= step * bound + 1e-6 * scale).all()
    np.testing.assert_array_equal(unpack_nbits(pack_nbits(q, bits), bits), q)


def test_zero_point_packing_pads_rows():
    zp = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    assert pack_zero_points(zp, 4).tolist() == [0x21, 0x03, 0x54, 0x06]
    assert pack_zero_points(zp, 8).tolist() == [1, 2, 3, 4, 5, 6]


def _matmul_model(k: int, n: int, tied: bool, constant: bool = True) -> tuple[ir.Model, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k) if tied else (k, n)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, k]))
    nodes, inits, inputs = [], [], [x]
    if constant:
        wv = ir.Value(
            name="w", const_value=ir.Tensor(w), shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT)
        )
        inits.append(wv)
    else:
        wv = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT))
        inputs.append(wv)
    b = wv
    if tied:
        t = ir.node("Transpose", [wv], attributes={"perm": [1, 0]})
        nodes.append(t)
        b = t.outputs[0]
    mm = ir.node("MatMul", [x, b])
    mm.outputs[0].name = "y"
    nodes.append(mm)
    graph = ir.Graph(inputs, [mm.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10), (w.T if tied else w)


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (8, True), (8, False)])
@pytest.mark.parametrize(("k", "tied"), [(64, False), (40, False), (64, True)])
def test_matmul_nbits_equals_dequantized(bits, symmetric, k, tied):
    model, w_kn = _matmul_model(k, 24, tied)
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    before = _run(model, {"x": x})
    qpass = QuantizeMatMulPass(WeightQuant(bits, 32, symmetric))
    assert (r := qpass(model)).modified
    ops = [n.op_type for n in model.graph]
    assert ops == ["MatMulNBits"]  # the Transpose and the fp32 weight are gone
    assert "w" not in model.graph.initializers
    after = _run(model, {"x": x})
    q, s, zp = quantize_blockwise(w_kn.T, bits, 32, symmetric)
    expected = x @ dequantize_blockwise(q, s, zp, k).T
    np.testing.assert_allclose(after, expected, atol=1e-4, rtol=1e-4)
    detail = r.report.details[0]
    assert r.report.matched == 1 and detail["shape"] == [24, k]
    rel = np.sqrt(((after - before) ** 2).mean() / (before**2).mean())
    assert rel < {4: 0.15, 8: 0.01}[bits] and detail["rel_rms_error"] < {4: 0.15, 8: 0.01}[bits]
    assert not QuantizeMatMulPass(WeightQuant(bits, 32, symmetric))(model).modified


def _split_case(tied: bool, k: int = 96, n: int = 40, keep: int = 32):
    """A MatMul whose input has `keep` loud channels (mean square ~100x the others), and that loudness."""
    model, w_kn = _matmul_model(k, n, tied)
    rng = np.random.default_rng(2)
    loudness = rng.random(k) + 0.5
    loud = rng.choice(k, keep, replace=False)
    loudness[loud] *= 100
    x = (rng.standard_normal((2, 3, k)) * np.sqrt(loudness)).astype(np.float32)
    return model, w_kn, loudness, np.sort(loud), x


@pytest.mark.parametrize("tied", [False, True])
def test_split_keeps_the_loud_channels_in_the_wider_form(tied, tmp_path):
    from mobilize.targets.onnx.passes.graph import WRITE_LAST
    from mobilize.targets.onnx.writer import save_onnx

    model, w_kn, loudness, loud, x = _split_case(tied)
    before = _run(model, {"x": x})
    qpass = QuantizeMatMulPass(SPLIT(32), importance=lambda name: loudness)
    assert (r := qpass(model)).modified
    assert [n.op_type for n in model.graph] == ["Gather", "Split", "MatMulNBits", "MatMulNBits", "Add"]
    kept, rest = (n for n in model.graph if n.op_type == "MatMulNBits")
    assert (kept.attributes["K"].value, kept.attributes["bits"].value, len(kept.inputs)) == (32, 8, 3)
    assert (rest.attributes["K"].value, rest.attributes["bits"].value, len(rest.inputs)) == (64, 4, 4)
    after = _run(model, {"x": x})
    quiet = np.setdiff1d(np.arange(96), loud)
    w_nk = w_kn.T
    hi = dequantize_blockwise(*quantize_blockwise(w_nk[:, loud], 8, 32, True), 32)
    lo = dequantize_blockwise(*quantize_blockwise(w_nk[:, quiet], 4, 32, False), 64)
    np.testing.assert_allclose(after, x[..., loud] @ hi.T + x[..., quiet] @ lo.T, atol=1e-3, rtol=1e-3)
    detail = r.report.details[0]
    assert detail["split"] == {"kept": {"channels": 32, "bits": 8, "block_size": 32},
                               "rest": {"channels": 64, "bits": 4, "block_size": 32}}  # fmt: skip
    whole = np.concatenate([hi, lo], axis=1) - np.concatenate([w_nk[:, loud], w_nk[:, quiet]], axis=1)
    expected_rel = np.sqrt((whole**2).sum() / (w_nk**2).sum())
    assert abs(detail["rel_rms_error"] - expected_rel) < 1e-4 * expected_rel
    # against the same weight all in the narrow form, the loud channels' error is what it saves
    narrow, _ = _matmul_model(96, 40, tied)
    QuantizeMatMulPass(WeightQuant(4, 32, False))(narrow)
    error = lambda y: float(np.sqrt(((y - before) ** 2).mean()))  # noqa: E731
    assert error(after) < 0.5 * error(_run(narrow, {"x": x}))
    assert not QuantizeMatMulPass(SPLIT(32), importance=lambda name: loudness)(
        model
    ).modified
    # written after every other initializer, even those added later (an embedding's): they wait on calibration
    assert all(v.meta.get(WRITE_LAST) for v in model.graph.initializers.values() if ".split32." in v.name)
    import onnx

    from mobilize.targets.onnx.passes.graph import initializer

    initializer(model.graph, "added_later", np.zeros(300, np.float32))
    save_onnx(model, tmp_path)
    names = [t.name for t in onnx.load(tmp_path / "model.onnx", load_external_data=False).graph.initializer]
    assert names[0] == "added_later" and len(names) == 8, names


@pytest.mark.parametrize("case", ["no statistics", "no more channels than kept"])
def test_split_needs_statistics_and_more_channels_than_it_keeps(case):
    model, w_kn, loudness, _, x = _split_case(False)
    importance, keep = (None, 32) if case == "no statistics" else (lambda name: loudness, 96)
    qpass = QuantizeMatMulPass(SPLIT(keep), importance=importance)
    assert (r := qpass(model)).modified
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]  # the plain form: all of it 8-bit
    assert "split" not in r.report.details[0] and r.report.details[0]["bits"] == 8


def test_non_constant_weight_is_not_quantized():
    model, _ = _matmul_model(64, 8, tied=False, constant=False)
    qpass = QuantizeMatMulPass()
    assert not (r := qpass(model)).modified
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert r.report.rejected == {"weight is not a constant initializer": 1}


def _grid_model(k: int, n: int, bits: int, float_zero_points: bool) -> tuple[ir.Model, np.ndarray]:
    """A MatMul whose weight lies on a source block grid (as a GGUF's Q4_K or Q5_0 would): blocks of 32 along
    K with a scale each and a zero point (float for the Q4_K-like grid)."""
    from mobilize.frontend.sources.gguf_grid import BlockGrid

    rng = np.random.default_rng(3)
    scale = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float32)
    zp = rng.uniform(2, 13, scale.shape) if float_zero_points else np.full(scale.shape, 1 << (bits - 1))
    zp = zp.astype(np.float32)
    q = rng.integers(0, 1 << bits, (n, k // 32, 32))
    w_nk = ((q - zp[..., None]) * scale[..., None]).reshape(n, k).astype(np.float32)
    model, _ = _matmul_model(k, n, tied=False)
    wv = model.graph.initializers["w"]
    wv.const_value = ir.Tensor(np.ascontiguousarray(w_nk.T))
    wv.meta["block_form"] = (4 if float_zero_points else 8, 32)
    wv.meta["block_grid"] = lambda: BlockGrid(4 if float_zero_points else 5, 32, scale, zp)
    return model, w_nk.T


@pytest.mark.parametrize(
    ("grid", "wide_block_size", "widen_below", "stored"),
    [
        ("q5", 0, 0, (8, 32, ["MatMulNBits"])),  # carried exactly, its own blocks
        ("q5", 128, 0, (8, 128, ["MatMulNBits"])),  # wider than 4 bits: 8-bit symmetric blocks of 128
        ("q4k", 128, 0, (4, 32, ["MatMulNBits", "Reshape", "ReduceSum", "MatMul", "Add"])),  # exact + correction
        ("q4k", 128, 10**6, (8, 128, ["MatMulNBits"])),  # smaller than widen_below: 8-bit, no correction ops
        ("q4k", 128, 256 * 48, (4, 32, ["MatMulNBits", "Reshape", "ReduceSum", "MatMul", "Add"])),  # not smaller
    ],
)
def test_source_grids_carried_or_widened(grid, wide_block_size, widen_below, stored):
    k, n = 256, 48
    model, w_kn = _grid_model(k, n, 5 if grid == "q5" else 4, float_zero_points=grid == "q4k")
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    quant = WeightQuant(4, 32, False)
    caps = replace(ONNX_CAPS, wide_block_size=wide_block_size, widen_below=widen_below)
    qpass = QuantizeMatMulPass(quant, carry_source_blocks=True, caps=caps)
    assert (r := qpass(model)).modified
    bits, block, ops = stored
    assert [n.op_type for n in model.graph] == ops
    detail = r.report.details[0]
    assert (detail["bits"], detail["block_size"]) == (bits, block)
    assert detail["carried_from_source"] == (block == 32)
    after, exact = _run(model, {"x": x}), x @ w_kn
    rel = np.sqrt(((after - exact) ** 2).mean() / (exact**2).mean())
    if block == 32:  # exact to float rounding
        assert rel < 1e-5 and detail["rel_rms_error"] < 1e-6
    else:  # re-rounded onto 8-bit blocks of 128: far finer than the 4/5-bit source grid, not exact
        assert 1e-5 < rel < 0.01 and 0 < detail["rel_rms_error"] < 0.01
    assert not QuantizeMatMulPass(quant, carry_source_blocks=True, caps=caps)(model).modified
