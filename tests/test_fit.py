"""`mobilize fit`: memory and the decode bound, checked against numbers computed here by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # (over 5 s: out of the fast subset)
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
    # the matrices are repacked by the runtime (anonymous memory, with the KV cache and activations); the lookup
    # table stays in the mapped file (file-backed, a row read per token) and is not counted
    assert m["weights_repacked_bytes"] == d["weight_bytes_per_token"]
    assert m["weights_file_backed_bytes"] == m["weights_bytes"] - d["weight_bytes_per_token"] > 0
    assert m["anonymous_bytes"] == d["weight_bytes_per_token"] + m["kv_cache_bytes"] + m["activation_bytes"] + (
        m["runtime_bytes"]
    )
    assert m["total_bytes"] == m["anonymous_bytes"]
    assert m["fits"] and m["budget_bytes"] == 4_500_000_000
    expected = 51.2e9 / (d["weight_bytes_per_token"] + m["kv_cache_bytes"])
    assert abs(d["tokens_per_s_at_most"] - expected) < 1e-6
    # the range a phone reaches: 0.25-0.45 of the peak
    assert d["tokens_per_s"] == [0.25 * d["tokens_per_s_at_most"], 0.45 * d["tokens_per_s_at_most"]]
    text = _cli("fit", str(out), "--device", "pixel6").stdout
    assert "fits" in text and "0.25-0.45 x 51.2 GB/s" in text and "repacked" in text
    every = tmp_path / "all"
    assert _cli("export", str(tiny_hf("llama")), "--out", str(every), "-q", "int8", "--logits", "all").returncode == 0
    r = _cli("fit", str(every), "--device", "pixel6", "--prompt-len", "10", "--json")
    assert json.loads(r.stdout)["memory"]["activation_bytes"] == 10 * 128 * 4  # every position's logits
    bad = _cli("fit", str(out), "--device", "nokia3310")
    assert bad.returncode == 1 and "unknown device 'nokia3310'" in bad.stderr


def test_android_plan_fits_a_7b_on_the_pixel6():
    """The android preset plans the KV cache for its device from the planned weights, before writing anything:
    a 7B's int4 weights (about 4.6 bits per weight, embedding and head included) leave room for a float16 cache of
    1024 positions in ONNX; TFLite (whose float16 cache costs a float32 copy per read) takes float32 at 512."""
    from pathlib import Path

    from mobilize.driver import ExportOptions, plan_cache
    from mobilize.frontend.loader import load_model, open_checkpoint
    from mobilize.quant.plan import estimate_weight_bytes
    from mobilize.quant.recipes import RECIPES
    from mobilize.targets.registry import target

    model = load_model(open_checkpoint("llama-7b", random_weights=True))
    chosen = {}
    for fmt in ("onnx", "tflite"):
        opts = ExportOptions("llama-7b", Path("unused"), random_weights=True, format=fmt).resolved()
        weights, per_token = estimate_weight_bytes(model, RECIPES["int4"], target(fmt).caps, False)
        assert 3.7e9 < weights < 3.9e9 and per_token < weights
        length, dtype, record = plan_cache(opts, model, RECIPES["int4"], target(fmt), calibrating=False)
        chosen[fmt] = (length, dtype)
        assert record["plan"]["chose"]["predicted_fit"] and record["plan"]["passed_over"]  # 2048 did not fit
    assert chosen == {"onnx": (1024, "float16"), "tflite": (512, "float32")}
    # asked for explicitly, the cache is what was asked (and a package that cannot fit is refused)
    opts = ExportOptions("llama-7b", Path("unused"), random_weights=True, max_seq_len=2048, kv_dtype="float32")
    import pytest

    from mobilize.errors import MobilizeError

    with pytest.raises(MobilizeError, match="does not fit a pixel6.*--ignore-fit"):
        plan_cache(opts.resolved(), model, RECIPES["int4"], target("onnx"))


def test_export_that_does_not_fit_stops(tmp_path):
    """A 7B for the ios preset's 6 GB iPhone: no cache makes it fit, so export stops before writing, in one line."""
    out = tmp_path / "pkg"
    r = _cli("export", "llama-7b", "--random-weights", "--target", "ios", "--out", str(out))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit a iphone15" in lines[0] and "--ignore-fit" in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ignore_fit_writes_what_does_not_fit(tiny_hf, tmp_path, monkeypatch):
    """On a device too small for anything, export refuses (nothing written) unless --ignore-fit; the manifest of
    the package written anyway says it does not fit."""
    import dataclasses

    import pytest

    from mobilize.driver import ExportOptions, export
    from mobilize.errors import MobilizeError
    from mobilize.targets import devices

    tiny = dataclasses.replace(devices.DEVICES["pixel6"], resident_gb=1e-6)
    monkeypatch.setitem(devices.DEVICES, "pixel6", tiny)
    out = tmp_path / "pkg"
    opts = ExportOptions(str(tiny_hf("llama")), out, quant="int8", max_seq_len=64)
    with pytest.raises(MobilizeError, match="does not fit a pixel6"):
        export(opts)
    assert not out.exists() and not list(tmp_path.iterdir())
    export(dataclasses.replace(opts, ignore_fit=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["memory"]["fits"] is False and manifest["target"]["plan"]["chose"]["predicted_fit"] is False
