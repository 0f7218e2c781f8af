"""A GGUF's quantized blocks become MatMulNBits weights exactly (no re-rounding) under the int4 recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.sources.gguf_file import read_gguf
from mobilize.frontend.sources.gguf_grid import block_grid
from mobilize.quant.recipes import WeightQuant
from mobilize.targets.onnx.caps import ONNX_CAPS
from mobilize.targets.onnx.runner import OrtRunner

sys.path.insert(0, str(Path(__file__).parent))
from helpers import write_tiny_gguf  # noqa: E402

QUANT = {"attn_q.weight": "Q5_0", "ffn_up.weight": "Q8_0", "ffn_down.weight": "Q4_0"}


@pytest.fixture(scope="module")
def quantized_gguf(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("qgguf") / "llama-mixed.gguf"
    return write_tiny_gguf(FAMILIES["llama"].tiny(), tiny_hf("llama"), out, quant=QUANT)


@pytest.mark.parametrize("kind", ["Q5_0", "Q8_0"])
def test_grid_reproduces_dequantized_values(quantized_gguf, kind):
    _, tensors = read_gguf(str(quantized_gguf))
    ref = next(r for r in tensors.values() if r.dtype == kind)
    w, grid = ref.load(), block_grid(kind, ref.raw())
    s = np.repeat(grid.scale, grid.block_size, axis=1)
    z = np.repeat(grid.zero_point, grid.block_size, axis=1)
    q = np.round(w / s + z)
    assert q.min() >= 0 and q.max() < 2**grid.bits
    np.testing.assert_array_equal((q - z) * s, w)


EXACT = replace(ONNX_CAPS, wide_block_size=0, widen_below=0)  # every source grid kept as it is


def test_int4_export_carries_blocks(quantized_gguf, tmp_path):
    def export(quant: str) -> Path:
        out = tmp_path / quant
        cmd = [
            sys.executable,
            "-m",
            "mobilize.cli",
            "export",
            str(quantized_gguf),
            "--out",
            str(out),
            "-q",
            quant,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return out

    int4 = export("int4")
    reports = json.loads((int4 / "manifest.json").read_text())["build_report"]["passes"]
    body = next(p for p in reports if p["pass"].startswith("quantize_matmul("))
    by_weight = {t["weight"]: t for t in body["tensors"]}
    # q_proj (Q5_0, rows un-permuted from llama.cpp's order) and up_proj (Q8_0): grids wider than 4 bits stay
    # 8-bit, as symmetric blocks of 128 (re-rounded onto the finer 8-bit grid: a small error, not 4-bit's);
    # Q4_0 has no exact MatMulNBits form here, so down_proj is re-rounded to 4 bits, as are the F32 weights (in
    # blocks of 64: with fp32 scales and zero points, the recipe's 4.6 bits per weight).
    wide = [f"model.layers.{i}.{name}.weight" for i in range(2) for name in ("self_attn.q_proj", "mlp.up_proj")]
    for name in wide:
        t = by_weight[name]
        assert (t["bits"], t["block_size"], t["carried_from_source"]) == (8, 128, False), t
        assert t["rel_rms_error"] < 0.01, t
    rest = [t for name, t in by_weight.items() if name not in wide]
    assert len(rest) == 2 * 5 and all((t["bits"], t["block_size"]) == (4, 64) for t in rest)
    assert all(t["rel_rms_error"] > 0.02 for t in rest)  # 4-bit re-rounding: far coarser than the wide grids
    assert body["rejected"]["no source block grid: re-rounded"] == 2 * 5  # k, v, o, gate, down per layer


def test_carried_graph_computes_what_the_gguf_says(tiny_hf, tmp_path):
    """Every linear weight in Q8_0 or Q5_0: after carrying, the MatMulNBits graph in onnxruntime equals the
    fp32 graph of the same GGUF (the dequantized values) to float rounding."""
    from mobilize.frontend.loader import load_model, open_checkpoint
    from mobilize.targets.onnx.emitter import build_decoder
    from mobilize.targets.onnx.passes.quantize import QuantizeMatMulPass
    from mobilize.targets.onnx.writer import save_onnx

    quant = {s: "Q8_0" for s in ("attn_q.weight", "attn_v.weight", "ffn_up.weight", "output.weight")}
    quant |= {s: "Q5_0" for s in ("attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_down.weight")}
    path = write_tiny_gguf(FAMILIES["llama"].tiny(), tiny_hf("llama"), tmp_path / "all.gguf", quant=quant)
    model = load_model(open_checkpoint(str(path)))
    fp32 = OrtRunner(save_onnx(build_decoder(model), tmp_path / "fp32"))
    graph = build_decoder(model)
    qpass = QuantizeMatMulPass(WeightQuant(4, 32, False), carry_source_blocks=True, caps=EXACT)
    assert (r := qpass(graph)).modified and r.report.matched == 2 * 7 + 1
    assert all(t["carried_from_source"] for t in r.report.details)
    carried = OrtRunner(save_onnx(graph, tmp_path / "carried"))
    prompt = [3, 17, 99, 5, 64]
    np.testing.assert_allclose(carried.prefill(prompt), fp32.prefill(prompt), atol=1e-4)
