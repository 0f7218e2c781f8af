"""Activation smoothing (quant/smooth.py): exact in float for every family, LoRA slots included; taken by TFLite's
quantized recipes only, and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_tracks_reference, cli, peft_targets, with_word_tokenizer, write_peft_adapter

from mobilize import driver
from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.harness.package import Package
from mobilize.harness.reference import ReferenceRunner
from mobilize.model.numpy_runner import NumpyRunner
from mobilize.quant import plan
from mobilize.quant.smooth import smooth

PROMPT = [3, 17, 99, 5, 64, 1, 42]
FAST = ("llama", "gemma3")


def _statistics(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Mean squares spread over six decades, so that the factors differ a lot between channels."""
    rng = np.random.default_rng(seed)
    return {name.removesuffix(".bias"): 10.0 ** rng.uniform(-3, 3, ref.shape[1]).astype(np.float32)
            for name, ref in model.weights.items() if len(ref.shape) == 2 and ".layers." in name}  # fmt: skip


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_smoothed_model_computes_the_same(family, tiny_hf):
    """The numpy decoder on the smoothed weights gives the source's logits (norms, v and up rows, GQA, biases)."""
    model = load_model(open_checkpoint(str(tiny_hf(family))))
    stats = _statistics(model)
    smoothed, seen, sm = smooth(model, stats)
    modules = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
    factors = [sm.input_factor(f"model.layers.0.{m}") for m in modules]
    assert all(f.max() / f.min() > 5 for f in factors)  # the test moves the channels a lot
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(seen[q], stats[q] / factors[0].astype(np.float64) ** 2, rtol=1e-6)
    assert smoothed.weights[q].raw is None and smoothed.weights[q].altered
    expected, got = NumpyRunner(model).prefill(PROMPT), NumpyRunner(smoothed).prefill(PROMPT)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    # a weight the target carries on its source grid: its group (o_proj's input, v_proj's rows) is left alone
    o = "model.layers.0.self_attn.o_proj.weight"
    kept, _, sm = smooth(model, stats, carried={o})
    assert kept.weights[o] is model.weights[o] and sm.output_divisor("model.layers.0.self_attn.v_proj") is None
    assert sm.record()["groups_left_on_their_grid"] == 1
    assert sm.input_factor("model.layers.1.self_attn.o_proj") is not None
    np.testing.assert_allclose(NumpyRunner(kept).prefill(PROMPT), expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_smoothed_tflite_package_and_its_lora_slots_are_exact(family, tiny_hf, tmp_path, monkeypatch):
    """Float weights smoothed as a quantized recipe's would be (forced here: fp32 takes none) in a TFLite package with
    LoRA slots on q, k, v, o: with a PEFT adapter, transformers + peft's logits; without, the base's (the slots'
    branches put the factors back)."""
    monkeypatch.setattr(plan, "smooths", lambda recipe, caps: caps.row_quantized_activations)
    monkeypatch.setattr(driver, "smooths", lambda recipe, caps: caps.row_quantized_activations)
    src = with_word_tokenizer(tiny_hf(family), tmp_path / "src", tmp_path / "text.txt", 50)
    out = driver.export(driver.ExportOptions(
        str(src), tmp_path / "pkg", target="host", format="tflite", quant="fp32", max_seq_len=64, prefill_lens=(4,),
        lora_slots=4, lora_targets="q,k,v,o"))  # fmt: skip
    report = json.loads((out / "manifest.json").read_text())["build_report"]["calibration"]
    assert report["smoothing"]["alpha"] == 0.5
    peft = write_peft_adapter(src, tmp_path / "peft", peft_targets(family, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                              r=4)  # fmt: skip
    r = cli("adapter", peft, "--package", out, "-o", tmp_path / "a.lora.tflite")
    assert r.returncode == 0, r.stderr
    runner = Package.open(out).runner(adapters=[tmp_path / "a.lora.tflite"])
    assert_tracks_reference(ReferenceRunner(src, adapters=[peft]), runner, PROMPT)
    runner.activate(None)
    assert_tracks_reference(ReferenceRunner(src), runner, PROMPT)


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_quantized_tflite_is_smoothed_and_onnx_is_not(fmt, tiny_hf, tmp_path):
    src = with_word_tokenizer(tiny_hf("gemma3"), tmp_path / "src", tmp_path / "text.txt", 50)
    r = cli("export", src, "-o", tmp_path / "pkg", "-t", "host", "-q", "int8", "--max-seq-len", "64", "-f", fmt)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(Path(tmp_path / "pkg" / "manifest.json").read_text())
    assert ("smoothing" in manifest["build_report"]["calibration"]) == (fmt == "tflite")
