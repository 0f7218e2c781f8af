"""Calibration statistics and activation-aware rounding."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from mobilize.driver import ExportOptions, export
from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.quant.calibrate import (
    RANKING_TOKENS,
    TEXT,
    CalibrationInBackground,
    fewest_pieces_tokenizer,
    input_statistics,
)
from mobilize.quant.primitives import quantize_blockwise, search_blocks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_statistics_match_transformers(family, tiny_hf):
    """The numpy forward gives each linear layer's (and the head's) input statistics as transformers does."""
    torch = pytest.importorskip("torch")
    from mobilize.harness.reference import ReferenceRunner

    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 128, 19).tolist(), rng.integers(0, 128, 7).tolist()]  # past gemma's window of 4
    ours = input_statistics(load_model(open_checkpoint(str(tiny_hf(family)))), sequences)

    ref = ReferenceRunner(tiny_hf(family))
    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().numpy()
            sums[name] = sums.get(name, 0.0) + np.square(x).sum(axis=0)

        return record

    for name, module in ref.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name))
    for s in sequences:
        ref.prefill(s)
    count = sum(len(s) for s in sequences)
    for name in list(sums):  # a fused projection (phi3's qkv_proj) is the input of each weight its rows hold
        stem, _, module = name.rpartition(".layers.")[2].partition(".")
        for part in FAMILIES[family].fused.get(module, ()):
            sums[name.rsplit(module, 1)[0] + part] = sums[name]
        if module in FAMILIES[family].fused:
            del sums[name]
    assert set(ours) == {n + ".weight" for n in sums}
    for name, total in sums.items():
        np.testing.assert_allclose(ours[name + ".weight"], total / count, rtol=1e-4, atol=1e-7, err_msg=name)


def _weighted_error(blocks, q, scale, zero_point, h):
    deq = (q.astype(np.float64) - zero_point[..., None]) * scale.astype(np.float64)[..., None]
    return (h * np.square(deq - blocks)).sum(axis=-1)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True)])
def test_search_never_loses_to_rounding_to_nearest(bits, symmetric):
    """Per block, the searched scale's weighted error is at most round-to-nearest's (its first candidate),
    and weighting moves the error off the channels whose activations run large."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 64)).astype(np.float32) * 0.05
    w[:, 5] *= 8  # an outlier weight column
    h = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    h[[9, 40]] = 400.0  # two input channels with large activations
    q0, s0, z0 = quantize_blockwise(w, bits, 32, symmetric)
    q1, s1, z1 = quantize_blockwise(w, bits, 32, symmetric, importance=h)
    blocks, hb = w.reshape(512, 2, 32), h.reshape(2, 32)
    e0, e1 = _weighted_error(blocks, q0, s0, z0, hb), _weighted_error(blocks, q1, s1, z1, hb)
    assert np.all(e1 <= e0 * (1 + 1e-5) + 1e-12)
    assert e1.sum() < 0.8 * e0.sum()
    if symmetric:
        assert np.all(z1 == 1 << (bits - 1))  # the zero point ONNX Runtime's fast kernels want
    err_hot = np.abs((q1.astype(np.float32) - z1[..., None]) * s1[..., None] - blocks).reshape(512, 64)[:, [9, 40]]
    err_rtn = np.abs((q0.astype(np.float32) - z0[..., None]) * s0[..., None] - blocks).reshape(512, 64)[:, [9, 40]]
    assert err_hot.mean() < 0.5 * err_rtn.mean()


def test_search_positive_fp16_scales_for_xnnpack():
    rng = np.random.default_rng(3)
    blocks = rng.standard_normal((300, 4, 32)).astype(np.float32)
    blocks[:7] = 0.0  # all-zero blocks keep a zero scale and code 8 (exactly 0)
    q, scale, zp = search_blocks(blocks, 4, True, None, scale_dtype=np.float16, negative_scales=False)
    assert scale.dtype == np.float16 and np.all(scale >= 0) and np.all(zp == 8)
    assert np.all(q[:7] == 8) and q.max() <= 15
    # per block no worse than rounding to nearest with max|w| on code 15 (clipping may add error to an extreme)
    e = np.square((q.astype(np.float32) - 8) * scale.astype(np.float32)[..., None] - blocks).sum(-1)
    s7 = (np.abs(blocks).max(-1) / 7).astype(np.float16).astype(np.float32)[..., None]
    rtn = np.clip(np.round(blocks / np.where(s7 == 0, 1, s7)), -8, 7) * s7
    assert np.all(e <= np.square(rtn - blocks).sum(-1) * (1 + 1e-4) + 1e-9)


def _with_word_tokenizer(src, dst):
    """A copy of a tiny checkpoint with a word-level tokenizer over the calibration text's first words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(src, dst)
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]", TEXT.read_text())))[:127]
    tok = Tokenizer(models.WordLevel({"<unk>": 0} | {w: i + 1 for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    return dst


@pytest.mark.parametrize(("fmt", "quant"), [("tflite", "int4"), ("onnx", "int4-all-cal"), ("onnx", "int4")])
def test_export_calibrates_where_the_recipe_says(fmt, quant, tiny_hf, tmp_path):
    src = _with_word_tokenizer(tiny_hf("gemma3"), tmp_path / "src")
    out = export(ExportOptions(str(src), tmp_path / "pkg", format=fmt, quant=quant))
    report = json.loads((out / "manifest.json").read_text())["build_report"]
    assert report["calibration"]["used"] is True and report["calibration"]["tokenized_by"] == "tokenizer.json"
    if (fmt, quant) == ("onnx", "int4"):  # calibrates (in a child process) only to rank the head's input channels
        assert report["calibration"]["tokens"] == RANKING_TOKENS + 1  # and BOS
    else:
        assert report["calibration"]["tokens"] > 500
    if fmt == "tflite":
        tensors = report["passes"][0]["tensors"]
        calibrated = [k for k, v in tensors.items() if v.get("calibrated")]
        # every body weight searched with the statistics; the head (fewer channels than the 256 a split keeps: not
        # split) in the split head's own 8 bits, one scale per row, and the lookup reads it (a shared table)
        head = tensors["model.embed_tokens.weight.head"]
        assert head["bits"] == 8 and not head.get("calibrated") and len(calibrated) == len(tensors) - 1
    elif quant == "int4":  # ONNX: the tiny model's head has fewer channels than the 256 kept: not split, 8-bit
        (head,) = next(p for p in report["passes"] if p["pass"].startswith("quantize_matmul[head]"))["tensors"]
        assert "split" not in head and head["bits"] == 8
    else:
        matmuls = next(p for p in report["passes"] if p["pass"].startswith("quantize_matmul"))
        names = [t["weight"] for t in matmuls["tensors"]]
        assert len(names) == 6 * 4 + 1, names  # per layer: packed q+k+v, o, gate+up, down; and the head
        assert all(t["calibrated"] for t in matmuls["tensors"])

    # the same checkpoint without a tokenizer: rounded to nearest, and the manifest says why
    plain = export(ExportOptions(str(tiny_hf("gemma3")), tmp_path / "plain", format=fmt, quant=quant))
    calibration = json.loads((plain / "manifest.json").read_text())["build_report"]["calibration"]
    why = "the source has no tokenizer.json: rounded to nearest" + (", inputs not smoothed" if fmt == "tflite" else "")
    assert calibration == {"used": False, "why": why}
    if fmt == "tflite":  # and with it, TFLite smooths the inputs (quant/smooth.py)
        assert report["calibration"]["smoothing"]["alpha"] == 0.5


def test_calibration_child_that_fails_returns_none(tmp_path):
    """The export then converts and calibrates in its own process, and reports any error in one line."""
    assert CalibrationInBackground(str(tmp_path / "missing.gguf"), False, 16).result() is None


def test_fewest_pieces_tokenizer_only_for_sentencepiece_vocabularies():
    from types import SimpleNamespace

    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "\u2581the", "\u2581t", "he", "."]}
    tok = fewest_pieces_tokenizer(SimpleNamespace(format="gguf", gguf_metadata=meta))
    assert tok.encode(" the.", add_special_tokens=False).ids == [1, 4]
    byte_level = meta | {"tokenizer.ggml.model": "gpt2"}
    assert fewest_pieces_tokenizer(SimpleNamespace(format="gguf", gguf_metadata=byte_level)) is None
    assert fewest_pieces_tokenizer(SimpleNamespace(format="hf", gguf_metadata=None)) is None
