"""The LiteRT target: every family's tiny model in fp32 matches transformers to 1e-4 through each
signature (prefill lengths, padding, decode through the cache); the file's structure (signatures,
KV tensor names, DYNAMIC_UPDATE_SLICE, weights shared between signatures); quantized forms; and the
package around it (export, verify, run, reproducible bytes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb
from helpers import assert_tracks_reference

from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.harness.reference import ReferenceRunner
from mobilize.quant.recipes import RECIPES
from mobilize.targets.tflite.emitter import build_tflite, kv_names
from mobilize.targets.tflite.runner import LiteRtRunner
from mobilize.targets.tflite.writer import weight_bytes

CASES = [(f, "hf") for f in FAMILIES] + [("llama", "gguf"), ("gemma3", "gguf")]
PROMPT = [3, 17, 99, 5, 64, 1, 42, 7, 8, 9, 10]  # 11 tokens: prefill_8 + prefill_4 padded by one


def _write(source, out: Path, quant="fp32", max_len=64, prefill=(4, 8)) -> Path:
    model = load_model(open_checkpoint(str(source)))
    tfl, _ = build_tflite(model, RECIPES[quant], max_len, list(prefill))
    path = out / "model.tflite"
    tfl.write(path)
    return path


@pytest.mark.parametrize(("family", "fmt"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_fp32_matches_transformers(family, fmt, tiny_hf, tiny_gguf, tmp_path):
    source = tiny_hf(family) if fmt == "hf" else tiny_gguf(family)
    ours = LiteRtRunner(_write(source, tmp_path))
    assert ours.prefill_lens == [4, 8]
    ref = ReferenceRunner(tiny_hf(family))
    np.testing.assert_allclose(ours.score(PROMPT), ref.prefill(PROMPT), atol=1e-4, rtol=0)
    # prefill: 10 tokens (prefill_8 + prefill_4 padded), 2 (padded), 8 (exactly one signature); then the
    # last prompt token and 8 more decoded through the cache the prefill signatures wrote
    for prompt in (PROMPT, PROMPT[:3], PROMPT[:9]):
        assert_tracks_reference(ref, ours, prompt)
    assert ours.length == len(PROMPT[:9]) + 8


def test_prompt_near_the_cache_end_runs_token_by_token(tiny_hf, tmp_path):
    """No prefill signature fits before the cache's end: the runner falls back to decode steps, and a
    prompt past the cache is refused with a clear error."""
    source = tiny_hf("gemma3")  # sliding window 4 < the prompt: the window mask is exercised too
    ours = LiteRtRunner(_write(source, tmp_path, max_len=10, prefill=(8,)))
    ref = ReferenceRunner(source)
    prompt = PROMPT[:10]
    np.testing.assert_allclose(ours.prefill(prompt), ref.prefill(prompt)[-1:], atol=1e-4, rtol=0)
    from mobilize.errors import MobilizeError

    with pytest.raises(MobilizeError, match="do not fit"):
        ours.decode(1)


def _model(path: Path):
    return fb.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()[: 1 << 24]), 0)


def test_structure_signatures_kv_and_shared_weights(tiny_hf, tmp_path):
    cfg = FAMILIES["llama"].tiny()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _write(tiny_hf("llama"), tmp_path / "a", prefill=(8,))
    three = _write(tiny_hf("llama"), tmp_path / "b", prefill=(4, 8, 16))
    m = _model(three)
    sigs = {s.signatureKey.decode(): s for s in m.signatureDefs}
    assert sorted(sigs) == ["decode", "prefill_16", "prefill_4", "prefill_8"]
    kv_shape = [1, cfg.num_kv_heads, 64, cfg.head_dim]
    for key, length in (("decode", 1), ("prefill_4", 4), ("prefill_16", 16)):
        graph = m.subgraphs[sigs[key].subgraphIndex]
        inputs = {t.name.decode(): list(graph.tensors[t.tensorIndex].shape) for t in sigs[key].inputs}
        outputs = {t.name.decode(): list(graph.tensors[t.tensorIndex].shape) for t in sigs[key].outputs}
        assert inputs["tokens"] == [1, length] and inputs["input_pos"] == [length]
        if key == "decode":
            assert outputs["logits"] == [1, 1, cfg.vocab_size]
        else:  # prefill computes no logits (LiteRT-LM decodes the prompt's last token)
            assert "logits" not in outputs
        for name in kv_names(cfg.num_layers):
            assert inputs[name] == kv_shape and outputs[name] == kv_shape
        codes = {m.operatorCodes[op.opcodeIndex].builtinCode for op in graph.operators}
        assert {fb.BuiltinOperator.DYNAMIC_UPDATE_SLICE, fb.BuiltinOperator.FULLY_CONNECTED} <= codes
        dus = [op for op in graph.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 151]
        assert len(dus) == 2 * cfg.num_layers
        assert {graph.tensors[op.outputs[0]].name.decode() for op in dus} == set(kv_names(cfg.num_layers))
    # One buffer per weight, referenced from every signature; two more signatures add no weight bytes.
    q_proj = {
        g.tensors[i].buffer for g in m.subgraphs for i in range(len(g.tensors))
        if g.tensors[i].name.decode() == "model.layers.0.self_attn.q_proj.weight"
    }  # fmt: skip
    assert len(q_proj) == 1 and m.buffers[q_proj.pop()].size == 4 * cfg.q_size * cfg.hidden_size
    weights = 4 * cfg.num_params
    buffers_one, buffers_three = weight_bytes(one)[0], weight_bytes(three)[0]
    assert weights <= buffers_one and buffers_three - buffers_one < 512  # new shape constants only
    assert three.stat().st_size - one.stat().st_size < 2 * 32 * 1024  # the two graphs' descriptions


@pytest.mark.parametrize("quant", ["int8", "int4-b32-sym", "int4-channel"])
def test_quantized_forms_run_close_to_fp32(quant, tiny_hf, tmp_path):
    source = tiny_hf("qwen2")
    model = load_model(open_checkpoint(str(source)))
    tfl, report = build_tflite(model, RECIPES[quant], 64, [8])
    path = tmp_path / "model.tflite"
    tfl.write(path)
    stats = report["tensors"]
    assert "model.layers.0.mlp.down_proj.weight" in stats
    bits = 8 if quant == "int8" else 4
    assert all(s["bits"] == bits for k, s in stats.items() if "layers" in k)
    assert all(0 < s["rel_rms_error"] < (0.02 if bits == 8 else 0.2) for s in stats.values())
    m = _model(path)
    fc_weights = [t for g in m.subgraphs[:1] for t in g.tensors if t.name.decode().endswith("up_proj.weight")]
    expected_type = fb.TensorType.INT8 if bits == 8 else fb.TensorType.INT4
    assert fc_weights and all(t.type == expected_type for t in fc_weights)
    if quant == "int4-b32-sym":
        assert fc_weights[0].quantization.detailsType == fb.QuantizationDetails.BlockwiseQuantization
    elif bits == 4:  # per output channel: a scale per row, no blockwise details
        assert len(fc_weights[0].quantization.scale) == fc_weights[0].shape[0]
    ref = ReferenceRunner(source).prefill(PROMPT)
    got = LiteRtRunner(path).score(PROMPT)
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    assert corr > (0.999 if bits == 8 else 0.95), corr


def _mobilize(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_export_verify_run_and_reproducible_bytes(tiny_hf, tmp_path):
    src = tiny_hf("gemma3")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = _mobilize("export", str(src), "--format", "tflite", "--quant", "int8", "--max-seq-len", "64",
                      "--prefill-len", "8", "-o", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "tflite, int8, max_seq_len 64" in r.stdout
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert "model.tflite" in files and "model.onnx" not in files and "genai_config.json" not in files
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["format"] == "tflite" and manifest["target"]["prefill_lens"] == [8]
    assert sorted(manifest["io"]["signatures"]) == ["decode", "prefill_8"]
    dtypes = {v["name"]: v["dtype"] for v in manifest["io"]["inputs"] + manifest["io"]["outputs"]}
    assert dtypes["tokens"] == dtypes["input_pos"] == "INT32" and dtypes["kv_cache_k_0"] == dtypes["logits"] == "FLOAT"
    assert manifest["kv_cache"]["shape"] == [1, 1, 64, 32]
    assert "fit" in manifest and manifest["fit"]["memory"]["kv_cache_bytes"] == 6 * 2 * 64 * 32 * 4
    assert "prefill_8" in (outs[0] / "README.md").read_text()
    assert _mobilize("verify", str(outs[0])).returncode == 0
    r = _mobilize("bench", str(outs[0]), "--prompt-len", "8", "--gen-len", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["records"][1]["avg_ts"] > 0

    model = outs[1] / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    for cmd in (["verify", str(outs[1])], ["bench", str(outs[1])], ["run", str(outs[1]), "-p", "hi"]):
        r = _mobilize(*cmd)
        assert r.returncode != 0 and "model.tflite does not match its sha256" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
