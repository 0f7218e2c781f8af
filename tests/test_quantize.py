"""Blockwise quantization: primitives by round-trip properties, the MatMulNBits pass on hand-built graphs
run in onnxruntime before and after."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobilize.passes.quant_primitives import (
    dequantize_blockwise,
    pack_nbits,
    pack_zero_points,
    quantize_blockwise,
    unpack_nbits,
)
from mobilize.passes.quantize import QuantizeMatMulPass


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
    qpass = QuantizeMatMulPass(bits=bits, block_size=32, symmetric=symmetric)
    assert qpass(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops == ["MatMulNBits"]  # the Transpose and the fp32 weight are gone
    assert "w" not in model.graph.initializers
    after = _run(model, {"x": x})
    q, s, zp = quantize_blockwise(w_kn.T, bits, 32, symmetric)
    expected = x @ dequantize_blockwise(q, s, zp, k).T
    np.testing.assert_allclose(after, expected, atol=1e-4, rtol=1e-4)
    detail = qpass.report.details[0]
    assert qpass.report.matched == 1 and detail["shape"] == [24, k]
    rel = np.sqrt(((after - before) ** 2).mean() / (before**2).mean())
    assert rel < {4: 0.15, 8: 0.01}[bits] and detail["rel_rms_error"] < {4: 0.15, 8: 0.01}[bits]
    assert not QuantizeMatMulPass(bits=bits, block_size=32, symmetric=symmetric)(model).modified


def test_non_constant_weight_is_not_quantized():
    model, _ = _matmul_model(64, 8, tied=False, constant=False)
    qpass = QuantizeMatMulPass()
    assert not qpass(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert qpass.report.rejected == {"weight is not a constant initializer": 1}
