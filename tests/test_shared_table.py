"""A tied embedding looked up in the head's own bytes: one table in the file, the same logits as two tables where
the two forms are the same, in both formats (tiny Gemma). The real Gemma 3 270M's int4 packages (the android
preset's, each format) are checked within the GGUF's bytes, their lookups in the head's bytes, in
tests/test_gemma3_real.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mobilize.driver import ExportOptions, export
from mobilize.harness.package import Package
from mobilize.quant.recipes import RECIPES, WeightQuant

GGUF_BYTES = 253_113_024  # the bundled Q4_K_M GGUF


def _model_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("model."))


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_shared_table_is_one_copy(tiny_hf, tmp_path, monkeypatch, fmt):
    head = WeightQuant(8, 32, True, carry=False)  # a plain 8-bit head; TFLite stores it per channel
    embedding = WeightQuant(8, 32, True) if fmt == "onnx" else WeightQuant(8, 0, True)  # the same form, apart
    base = dataclasses.replace(RECIPES["int8"], head=head, embedding=embedding)
    monkeypatch.setitem(RECIPES, "t-apart", dataclasses.replace(base, name="t-apart"))
    monkeypatch.setitem(RECIPES, "t-shared", dataclasses.replace(base, name="t-shared", share_tied_table=True))
    logits, sizes = {}, {}
    for name in ("t-apart", "t-shared"):
        out = tmp_path / name
        export(ExportOptions(str(tiny_hf("gemma3")), out, quant=name, format=fmt, max_seq_len=64))
        sizes[name] = _model_bytes(out)
        logits[name] = Package.open(out).runner().prefill(list(range(1, 30)))
        manifest = json.loads((out / "manifest.json").read_text())
        if fmt == "onnx":
            lookup = next(p for p in manifest["build_report"]["passes"] if p["pass"].startswith("quantize_embedding"))
            entry = (lookup.get("tensors") or lookup["details"])[0]
            assert ("shared_with_head" in entry) == (name == "t-shared")
    np.testing.assert_array_equal(logits["t-apart"], logits["t-shared"])
    vocab, hidden = 128, 64  # the tiny gemma's table: one 8-bit copy fewer (less the flatbuffer's alignment)
    assert sizes["t-apart"] - sizes["t-shared"] > vocab * hidden // 2
