"""A float16 KV cache in both formats: the cache tensors are float16 in the model's I/O and the manifest, the
runners and ONNX Runtime GenAI run it, and its logits stay close to the float32 cache's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mobilize.harness.package import Package


def _export(src, out, fmt, dtype, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mobilize.cli", "export", str(src), "--out", str(out), "-f", fmt, "-q", "int8",
           "--max-seq-len", "64", "--kv-dtype", dtype, *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _logits(path) -> np.ndarray:
    runner = Package.open(path).runner()
    tokens = list(range(1, 40))
    first = runner.prefill(tokens[:20])[-1]
    return np.stack([first] + [runner.decode(t) for t in tokens[20:]])


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_float16_cache(tiny_hf, tmp_path, fmt):
    src = tiny_hf("gemma3")  # sliding-window and global layers
    logits = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        r = _export(src, out, fmt, dtype)
        assert r.returncode == 0, r.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["kv_cache"]["dtype"] == dtype
        caches = [v for v in manifest["io"]["inputs"] if v["name"].startswith(("past_key_values.", "kv_cache_"))]
        assert caches and {v["dtype"] for v in caches} == {"FLOAT16" if dtype == "float16" else "FLOAT"}
        logits[dtype] = _logits(out)
    a, b = logits["float32"], logits["float16"]
    assert not np.array_equal(a, b)  # the cache really is rounded
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
    kv = json.loads((tmp_path / "float16" / "manifest.json").read_text())["fit"]["memory"]["kv_cache_bytes"]
    assert kv * 2 == json.loads((tmp_path / "float32" / "manifest.json").read_text())["fit"]["memory"]["kv_cache_bytes"]


def test_genai_runs_a_float16_cache(tiny_hf, tmp_path):
    import onnxruntime_genai as og

    out = tmp_path / "pkg"
    assert _export(tiny_hf("llama"), out, "onnx", "float16").returncode == 0
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=40, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([list(range(1, 20))], dtype=np.int32))
    genai = []
    while not gen.is_done():
        gen.generate_next_token()
        genai.append(int(gen.get_next_tokens()[0]))
    runner = Package.open(out).runner()
    ours = [int(runner.prefill(list(range(1, 20)))[-1].argmax())]
    while len(ours) < len(genai):
        ours.append(int(runner.decode(ours[-1]).argmax()))
    assert genai == ours


def test_bad_kv_dtype_is_one_line(tiny_hf, tmp_path):
    r = _export(tiny_hf("llama"), tmp_path / "a", "onnx", "int3")
    assert r.returncode == 2 or r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "--kv-dtype" in r.stderr
    r = _export(tiny_hf("llama"), tmp_path / "b", "onnx", "float16", "--opset", "std")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--opset ort" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
