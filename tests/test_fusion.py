"""Fusion, packing, static KV cache and cleanup passes: on tiny decoders from our builder (every family's
quirks) and on hand-built graphs for the cases that must not fuse. Each pass: the structure after it,
the same logits in onnxruntime before and after (prefill, then decode steps), `modified` false on a
second run, and a negative case."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.tape import Tape

from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import LoadedModel
from mobilize.frontend.sources.random_weights import random_tensors
from mobilize.targets.onnx.emitter import build_decoder
from mobilize.targets.onnx.passes.cleanup import CleanupPass
from mobilize.targets.onnx.passes.fuse_attention import FuseGroupQueryAttentionPass
from mobilize.targets.onnx.passes.fuse_rmsnorm import FuseRMSNormPass
from mobilize.targets.onnx.passes.fuse_rotary import FuseRotaryPass
from mobilize.targets.onnx.passes.kv_cache import StaticKVCachePass
from mobilize.targets.onnx.passes.pack_matmul import PackMatMulPass
from mobilize.targets.onnx.pipeline import onnx_passes, recipe_named, run_passes
from mobilize.targets.onnx.runner import OrtRunner
from mobilize.targets.onnx.writer import save_onnx

FAMILY_NAMES = sorted(FAMILIES)
MAX_LEN = 64


def plain(family: str) -> tuple[ir.Model, object]:
    cfg = FAMILIES[family].tiny()
    # Weights larger than a trained model's, so attention is far from uniform and mistakes show.
    return build_decoder(LoadedModel(None, cfg, random_tensors(cfg, std=0.3))), cfg


def logits(model: ir.Model, directory, n_decode: int = 8) -> np.ndarray:
    """Prefill 9 tokens, then decode `n_decode` (past a tiny Gemma's window of 4): every step's logits."""
    runner = OrtRunner(save_onnx(model, directory))
    rng = np.random.default_rng(0)
    prompt, steps = rng.integers(0, 128, 9).tolist(), rng.integers(0, 128, n_decode).tolist()
    return np.concatenate([runner.prefill(prompt)] + [runner.decode(t)[None] for t in steps])


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def assert_idempotent(p, model: ir.Model) -> None:
    """Nothing left to change: the same instance run again (as PassManager does) and a fresh one both say so."""
    assert not p(model).modified
    again = type(p)(**_args(p))
    assert not again(model).modified


def _args(p) -> dict:
    return {
        FuseRMSNormPass: lambda: {"std": p.std},
        FuseRotaryPass: lambda: {"max_seq_len": p.max_seq_len, "std": p.std},
        FuseGroupQueryAttentionPass: dict,
        StaticKVCachePass: lambda: {"max_seq_len": p.max_seq_len},
        PackMatMulPass: dict,
        CleanupPass: dict,
    }[type(p)]()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rmsnorm_fusion(family, tmp_path):
    model, cfg = plain(family)
    before = logits(model, tmp_path / "a")
    p = FuseRMSNormPass()
    assert p(model).modified
    counts = ops(model)
    norms_per_layer = 4 if cfg.sandwich_norm else 2
    qk = 2 if cfg.qk_norm else 0
    assert counts["SimplifiedLayerNormalization"] + counts["SkipSimplifiedLayerNormalization"] == (
        cfg.num_layers * (norms_per_layer + qk) + 1
    )
    assert counts["SkipSimplifiedLayerNormalization"] > 0 and counts["Sqrt"] == 0 and counts["ReduceMean"] == 0
    np.testing.assert_allclose(logits(model, tmp_path / "b"), before, atol=1e-4)
    # mean and 1/std (outputs 1 and 2) are never read: written unnamed, so ONNX Runtime skips them
    skips = [n for n in ir.to_proto(model).graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(list(n.output[1:3]) == ["", ""] and n.output[0] and n.output[3] for n in skips)
    assert_idempotent(p, model)


def test_rmsnorm_std_opset(tmp_path):
    model, _ = plain("llama")
    before = logits(model, tmp_path / "a")
    assert FuseRMSNormPass(std=True)(model).modified
    assert model.opset_imports[""] == 23 and ops(model)["RMSNormalization"] == 5
    assert "SkipSimplifiedLayerNormalization" not in ops(model)  # no skip form in standard ONNX
    np.testing.assert_allclose(logits(model, tmp_path / "b"), before, atol=1e-4)


def _norm_graph(square_other: bool = False, eps_input: bool = False) -> ir.Model:
    """x / sqrt(mean(x * x) + eps) * w, built by hand; optionally broken in one way."""
    t = Tape()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, 8]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, 8]))
    e = ir.Value(name="e", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    axes = t.initializer(ir.tensor(np.array([-1], np.int64)), name="axes")
    eps = e if eps_input else t.initializer(ir.tensor(np.array(1e-6, np.float32)), name="eps")
    w = t.initializer(ir.tensor(np.linspace(0.5, 1.5, 8, dtype=np.float32)), name="w")
    sq = t.op("Mul", [x, y if square_other else x])
    var = t.op("ReduceMean", [sq, axes], {"keepdims": 1})
    out = t.op("Mul", [t.op("Div", [x, t.op("Sqrt", [t.op("Add", [var, eps])])]), w])
    out.name = "out"
    graph = ir.Graph([x, y, e], [out], nodes=t.nodes, initializers=t.initializers, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"square_other": True}, "the squared tensor is not the normalized one"),
        ({"eps_input": True}, "epsilon is not a scalar constant"),
    ],
)
def test_rmsnorm_negative(kwargs, reason):
    model = _norm_graph(**kwargs)
    p = FuseRMSNormPass()
    assert not (r := p(model)).modified
    assert r.report.rejected == {reason: 1} and "Sqrt" in ops(model)
    assert FuseRMSNormPass()(_norm_graph()).modified  # the unbroken graph does fuse


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rotary_fusion(family, tmp_path):
    model, cfg = plain(family)
    before = logits(model, tmp_path / "a")
    p = FuseRotaryPass(MAX_LEN)
    assert p(model).modified
    assert ops(model)["RotaryEmbedding"] == 2 * cfg.num_layers and ops(model)["Cos"] == 0
    # one cos/sin table pair per rotary base (Gemma 3: local and global)
    tables = [n for n in model.graph.initializers if n.endswith(".cos")]
    assert len(tables) == len(set(cfg.layer_types))
    np.testing.assert_allclose(logits(model, tmp_path / "b"), before, atol=1e-4)
    assert_idempotent(p, model)


def test_rotary_negative_wrong_half_order():
    """rotate_half must be Concat(-x2, x1); Concat(-x1, x2) is some other rotation and must stay."""
    model, _ = plain("llama")
    for node in model.graph:
        if node.op_type == "Concat" and len(node.inputs) == 2:
            neg = node.inputs[0].producer()
            if neg is not None and neg.op_type == "Neg":
                x2 = neg.inputs[0]
                neg.replace_input_with(0, node.inputs[1])
                node.replace_input_with(1, x2)
    p = FuseRotaryPass(MAX_LEN)
    assert not (r := p(model)).modified
    assert r.report.rejected == {"the sin term is not rotate_half(x) of the cos term's x": 4}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_fusion_and_static_cache(family, tmp_path):
    model, cfg = plain(family)
    before = logits(model, tmp_path / "a", n_decode=30)
    FuseRMSNormPass()(model)
    FuseRotaryPass(MAX_LEN)(model)
    p = FuseGroupQueryAttentionPass()
    assert p(model).modified
    counts = ops(model)
    assert counts["GroupQueryAttention"] == cfg.num_layers
    assert counts["Softmax"] == counts["RotaryEmbedding"] == counts["Concat"] == counts["Where"] == 0
    assert_idempotent(p, model)
    np.testing.assert_allclose(logits(model, tmp_path / "b", n_decode=30), before, atol=1e-4)

    kv = StaticKVCachePass(MAX_LEN)
    assert kv(model).modified
    lengths = [v.shape[2] for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    window = [MAX_LEN if t == "full_attention" else cfg.sliding_window + 16 for t in cfg.layer_types]
    assert lengths == [n for n in window for _ in (0, 1)]
    assert_idempotent(kv, model)
    np.testing.assert_allclose(logits(model, tmp_path / "c", n_decode=30), before, atol=1e-4)


def test_static_cache_is_written_in_place(tmp_path):
    model, cfg = plain("llama")
    for p in (FuseRMSNormPass(), FuseRotaryPass(MAX_LEN), FuseGroupQueryAttentionPass(), StaticKVCachePass(MAX_LEN)):
        p(model)
    runner = OrtRunner(save_onnx(model, tmp_path))
    assert runner.static and runner.max_seq_len == MAX_LEN
    buffer = runner.buffers["past_key_values.0.key"]
    address = buffer.data_ptr()
    runner.prefill([1, 2, 3])
    runner.decode(4)
    view = buffer.numpy()
    assert buffer.data_ptr() == address and view.shape == (1, cfg.num_kv_heads, MAX_LEN, cfg.head_dim)
    assert np.abs(view[:, :, :4]).min() > 0 and not view[:, :, 4:].any()  # 4 positions written, no more
    with pytest.raises(Exception, match="do not fit the package's KV cache of 64"):
        runner.prefill(list(range(65)))


def test_static_cache_negative_without_fused_attention():
    model, cfg = plain("llama")
    p = StaticKVCachePass(MAX_LEN)
    assert not (r := p(model)).modified
    assert r.report.matched == 0 and sum(r.report.rejected.values()) == 2 * cfg.num_layers


def test_attention_negative_on_other_softmax():
    """A softmax over something that is not the grouped Q.K^T form stays as it is."""
    t = Tape()
    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4, 4]))
    b = ir.Value(name="b", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4, 4]))
    scale = t.initializer(ir.tensor(np.array(0.5, np.float32)), name="scale")
    s = t.op("Softmax", [t.op("Add", [t.op("Mul", [t.op("MatMul", [a, b]), scale]), a])], {"axis": -1})
    s.name = "s"
    model = ir.Model(
        ir.Graph([a, b], [s], nodes=t.nodes, initializers=t.initializers, opset_imports={"": 21}), ir_version=10
    )
    p = FuseGroupQueryAttentionPass()
    assert not (r := p(model)).modified and r.report.rejected == {"Q.K^T is not the 5-D grouped form": 1}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pack_matmul(family, tmp_path):
    model, cfg = plain(family)
    before = logits(model, tmp_path / "a")
    matmuls = ops(model)["MatMul"]
    p = PackMatMulPass()
    assert (r := p(model)).modified
    assert r.report.matched == 2 * cfg.num_layers  # q/k/v and gate/up of every layer
    assert ops(model)["Split"] == 2 * cfg.num_layers and ops(model)["MatMul"] == matmuls - 3 * cfg.num_layers
    packed = [d["packed"] for d in r.report.details]
    assert [w.rsplit(".", 2)[-2] for w in packed[0]] == ["q_proj", "k_proj", "v_proj"]
    np.testing.assert_allclose(logits(model, tmp_path / "b"), before, atol=1e-4)
    assert_idempotent(p, model)


def test_pack_negative_mixed_source_blocks():
    """Carrying source blocks, q (Q8_0 grid) and k/v (plain floats) are not packed: that would re-round q."""
    model, cfg = plain("llama")
    for v in model.graph.initializers.values():
        if v.name.endswith("q_proj.weight"):
            v.meta["block_grid"], v.meta["block_form"] = (lambda: None), (8, 32)
    p = PackMatMulPass(carry_blocks=True)
    r = p(model)
    assert r.report.matched == cfg.num_layers  # gate/up only
    assert r.report.rejected == {"parts have different source block formats (packing would re-round them)": 2}


def test_cleanup_folds_merges_and_removes():
    t = Tape()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    c1 = t.initializer(ir.tensor(np.array([1.0, 2.0, 3.0], np.float32)), name="c1")
    c2 = t.initializer(ir.tensor(np.array([1.0, 2.0, 3.0], np.float32)), name="c2")
    folded = t.op("Add", [c1, c1])  # constant: folds to [2, 4, 6]
    y = t.op("Mul", [t.op("Add", [x, folded]), c2])
    t.op("Neg", [x])  # dead
    y.name = "y"
    model = ir.Model(
        ir.Graph([x], [y], nodes=t.nodes, initializers=t.initializers, opset_imports={"": 21}), ir_version=10
    )
    p = CleanupPass()
    assert (r := p(model)).modified
    assert [n.op_type for n in model.graph] == ["Add", "Mul"]
    (details,) = r.report.details
    assert details["folded"] == 1 and details["nodes_removed"] >= 1
    import onnxruntime as ort

    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    np.testing.assert_allclose(sess.run(None, {"x": np.ones(3, np.float32)})[0], [3.0, 10.0, 21.0])
    assert not CleanupPass()(model).modified


@pytest.mark.parametrize("opset", ["ort", "std"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_whole_fp32_pipeline(family, opset, tmp_path):
    model, cfg = plain(family)
    before = logits(model, tmp_path / "a", n_decode=12)
    reports = run_passes(model, onnx_passes(recipe_named("fp32"), MAX_LEN, opset))
    assert all(r["matched"] > 0 for r in reports if not r["pass"].startswith("cleanup"))
    attention = {"ort": "GroupQueryAttention", "std": "Attention"}[opset]
    assert ops(model)[attention] == cfg.num_layers and ops(model)["Softmax"] == 0
    if opset == "std":  # nothing outside standard ONNX
        assert {n.domain for n in model.graph} <= {""} and model.opset_imports[""] == 23
    np.testing.assert_allclose(logits(model, tmp_path / "b", n_decode=12), before, atol=1e-4)


@pytest.mark.parametrize("recipe", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("opset", ["ort", "std"])
def test_pipeline_under_pass_manager_reaches_a_fixed_point(recipe, opset, tmp_path):
    """onnx_ir's PassManager runs the whole pipeline to a fixed point: the second round changes nothing, the
    static cache's metadata names the real sliding layers, and the logits are the plain graph's."""
    import json

    from mobilize.targets.onnx.passes.kv_cache import META_KEY

    model, cfg = plain("gemma3")
    before = logits(model, tmp_path / "a", n_decode=12)
    once, _ = plain("gemma3")
    run_passes(once, onnx_passes(recipe_named(recipe), MAX_LEN, opset))  # the export's way: each pass once
    passes = onnx_passes(recipe_named(recipe), MAX_LEN, opset)
    first = ir.passes.PassManager(passes, steps=1)(model)
    assert first.modified
    second = ir.passes.PassManager(passes, steps=3)(model)
    assert not second.modified
    if opset == "ort":
        meta = json.loads(model.metadata_props[META_KEY])
        sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
        assert meta["sliding_window"]["layers"] == sliding and meta["max_seq_len"] == MAX_LEN
    after = logits(model, tmp_path / "b", n_decode=12)
    np.testing.assert_allclose(after, logits(once, tmp_path / "c", n_decode=12), atol=1e-6)
    if recipe == "fp32":  # (a tiny random net amplifies quantization noise: the quantized ones are tested elsewhere)
        np.testing.assert_allclose(after, before, atol=1e-4)


def test_a_reused_pass_reports_each_run_alone():
    """The report comes with the call's result: a second run of one instance reports its own (empty) work."""
    model, cfg = plain("llama")
    p = FuseRMSNormPass()
    first, second = p(model), p(model)
    assert first.modified and first.report.matched > 0
    assert not second.modified and second.report.matched == 0 and first.report.matched > 0


def test_pipeline_order_is_checked():
    from mobilize.errors import MobilizeError

    model, _ = plain("llama")
    with pytest.raises(MobilizeError, match="StaticKVCachePass must run after FuseGroupQueryAttentionPass"):
        run_passes(model, [StaticKVCachePass(MAX_LEN), FuseGroupQueryAttentionPass()])
