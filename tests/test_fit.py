"""`mobilize fit`: memory and the decode bound, checked against numbers computed here by hand."""

from __future__ import annotations

import json
import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_fit_numbers(tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    assert _cli("export", str(tiny_hf("llama")), "--out", str(out), "-q", "int8", "--max-seq-len", "64").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["device"] == "pixel6"  # the android preset's device, checked at export
    r = _cli("fit", str(out), "--device", "pixel6", "--prompt-len", "10", "--json")
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    m, d = f["memory"], f["decode_roofline"]
    # tiny llama: 2 layers x (key, value) x 2 kv heads x 64 positions x head_dim 16 x 4 bytes
    assert m["kv_cache_bytes"] == 2 * 2 * 2 * 64 * 16 * 4
    assert m["activation_bytes"] == 128 * 4  # the logits: the last position's only (the default --logits last)
    assert m["weights_bytes"] >= (out / "model.onnx.data").stat().st_size
    # the 128 x 64 embedding is an 8-bit lookup: a token reads one row of it
    table = 128 * 64 + 128 * 2 * 4 + 128 * 2  # codes, fp32 scales and uint8 zero points per block of 32
    assert m["weights_bytes"] - d["weight_bytes_per_token"] == table - table // 128
    assert m["total_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"] + m["activation_bytes"] + m["runtime_bytes"]
    assert m["fits"] and m["budget_bytes"] == 4_000_000_000
    expected = 51.2e9 / (d["weight_bytes_per_token"] + m["kv_cache_bytes"])
    assert abs(d["tokens_per_s_at_most"] - expected) < 1e-6
    text = _cli("fit", str(out), "--device", "pixel6").stdout
    assert "fits" in text and "tok/s = 51.2 GB/s" in text
    every = tmp_path / "all"
    assert _cli("export", str(tiny_hf("llama")), "--out", str(every), "-q", "int8", "--logits", "all").returncode == 0
    r = _cli("fit", str(every), "--device", "pixel6", "--prompt-len", "10", "--json")
    assert json.loads(r.stdout)["memory"]["activation_bytes"] == 10 * 128 * 4  # every position's logits
    bad = _cli("fit", str(out), "--device", "nokia3310")
    assert bad.returncode == 1 and "unknown device 'nokia3310'" in bad.stderr
