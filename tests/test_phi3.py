"""phi3 (Phi-3, Phi-3.5, Phi-4-mini) beyond the family-wide tests: its fused projections are split exactly, its
partial rotary and LongRoPE magnitude are really in play, and what a package cannot hold is one error line.
(The family-wide tests match transformers in ONNX, TFLite and numpy; tests/test_llama_cpp_gguf.py does the same
from GGUFs written by llama.cpp's converter.)"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from helpers import assert_one_line_error, assert_tracks_reference, cli, write_tiny_hf

from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.harness.package import Package
from mobilize.harness.reference import ReferenceRunner
from mobilize.model.numpy_runner import NumpyRunner

PROMPT = [3, 17, 99, 5, 64, 1, 42]


def test_fused_projections_split_into_their_rows(tiny_hf):
    from safetensors.numpy import load_file

    src = tiny_hf("phi3")
    cfg, stored = FAMILIES["phi3"].tiny(), load_file(str(src / "model.safetensors"))
    weights = load_model(open_checkpoint(str(src))).weights
    p = "model.layers.1."
    qkv, gate_up = stored[p + "self_attn.qkv_proj.weight"], stored[p + "mlp.gate_up_proj.weight"]
    q, kv = cfg.q_size, cfg.kv_size
    for name, rows in (("self_attn.q_proj", qkv[:q]), ("self_attn.k_proj", qkv[q : q + kv]),
                       ("self_attn.v_proj", qkv[q + kv :]), ("mlp.gate_proj", gate_up[: cfg.intermediate_size]),
                       ("mlp.up_proj", gate_up[cfg.intermediate_size :])):  # fmt: skip
        np.testing.assert_array_equal(weights[p + name + ".weight"].load(), rows)


def test_partial_rotary_and_longrope_magnitude_are_in_play(tiny_hf):
    """Read without partial rotary, or without LongRoPE's attention factor, the tiny model moves far from
    transformers: the family tests' 1e-4 agreement is evidence for both."""
    model = load_model(open_checkpoint(str(tiny_hf("phi3"))))
    want = ReferenceRunner(tiny_hf("phi3")).prefill(PROMPT)
    scaling = tuple(kv for kv in model.config.rope_scaling if kv[0] != "attention_factor")
    for change in (dict(rotary_dim=None, rope_scaling=None), dict(rope_scaling=scaling + (("attention_factor", 1.0),))):
        wrong = dataclasses.replace(model, config=dataclasses.replace(model.config, **change))
        assert np.abs(NumpyRunner(wrong).prefill(PROMPT) - want).max() > 0.02 * np.abs(want).max(), change


def test_a_context_past_longrope_s_original_is_refused(tiny_hf, tmp_path):
    r = cli("export", tiny_hf("phi3"), "-o", tmp_path / "pkg", "-t", "host", "-q", "fp32", "--max-seq-len", "128")
    assert_one_line_error(r, "--max-seq-len 128", "context of 64", "LongRoPE", "long factors")
    assert not (tmp_path / "pkg").exists()


def test_a_fused_tensor_of_the_wrong_size_is_refused(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "hf"
    shutil.copytree(tiny_hf("phi3"), src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = tensors["model.layers.0.self_attn.qkv_proj.weight"][:-32]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    r = cli("inspect", src)
    assert_one_line_error(r, "'model.layers.0.self_attn.qkv_proj.weight'", "[96, 64]", "64 + 32 + 32 rows")
    tensors = load_file(str(tiny_hf("phi3") / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)  # beside the fused one
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(cli("inspect", src), "'model.layers.0.self_attn.q_proj.weight' is given twice")


def test_rotary_pairs_that_group_query_attention_cannot_take(tmp_path):
    """4 rotated pairs (GQA takes multiples of 8): the ONNX Runtime opset is refused in one line naming the fix, and
    the standard opset's package matches transformers."""
    cfg = dataclasses.replace(FAMILIES["phi3"].tiny(), rotary_dim=8, rope_scaling=None)
    src = write_tiny_hf(cfg, tmp_path / "hf")
    r = cli("export", src, "-o", tmp_path / "ort", "-t", "host", "-q", "fp32", "--max-seq-len", "64")
    assert_one_line_error(r, "rotates 4", "--opset std")
    r = cli("export", src, "-o", tmp_path / "std", "-t", "host", "-q", "fp32", "--max-seq-len", "64", "--opset", "std")
    assert r.returncode == 0, r.stderr
    assert_tracks_reference(ReferenceRunner(src), Package.open(tmp_path / "std").runner(), PROMPT)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_int4_package_records_the_split_weights(fmt, tiny_hf, tmp_path):
    r = cli("export", tiny_hf("phi3"), "-o", tmp_path / "pkg", "-t", "host", "-f", fmt, "-q", "int4",
            "--max-seq-len", "64")  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["architecture"]["rotary_dim"] == 16
    assert dict(manifest["architecture"]["rope_scaling"])["rope_type"] == "longrope"
    planned = json.dumps(manifest)
    assert "model.layers.0.self_attn.k_proj" in planned and "qkv_proj" not in planned


def _rope(c: dict, **changes) -> dict:
    return c | {"rope_parameters": c["rope_parameters"] | changes}


def _original(c: dict, value) -> dict:
    """original_max_position_embeddings set to `value` (None: taken out) where transformers keeps it, twice."""
    key = "original_max_position_embeddings"
    top, rope = {k: v for k, v in c.items() if k != key}, {k: v for k, v in c["rope_parameters"].items() if k != key}
    if value is None:
        return top | {"rope_parameters": rope}
    return top | {key: value, "rope_parameters": rope | {key: value}}


HOSTILE = {  # a config.json change -> what the one error line names
    "no rotary dims": (lambda c: c | {"partial_rotary_factor": 0}, "rotary_dim=0"),
    "rotary past the head": (lambda c: c | {"partial_rotary_factor": 1.5}, "at most head_dim=32"),
    "factor as text": (lambda c: c | {"partial_rotary_factor": "0.5"}, "partial_rotary_factor='0.5' must be a number"),
    "short factors too few": (lambda c: _rope(c, short_factor=[1.0, 2.0]), "short_factor has 2 divisors for 8"),
    "a NaN factor": (lambda c: _rope(c, short_factor=[float("nan")] * 8), "finite positive short_factor"),
    "factors not a list": (lambda c: _rope(c, long_factor=3), "long_factor=3 must be a list of numbers"),
    "no original context": (lambda c: _original(c, None), "original_max_position_embeddings=None"),
    "original context 0": (lambda c: _original(c, 0), "at least 2"),
    "yarn": (lambda c: _rope(c, rope_type="yarn"), "'yarn' is not supported for phi3"),
    "a negative attention factor": (lambda c: _rope(c, attention_factor=-1), "finite positive attention_factor"),
    "window 0": (lambda c: c | {"sliding_window": 0}, "sliding_window=0 must be a positive integer"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_phi3_config_is_one_line(case, tiny_hf, tmp_path):
    change, needle = HOSTILE[case]
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf("phi3"), src)
    (src / "config.json").write_text(json.dumps(change(json.loads((src / "config.json").read_text()))))
    r = cli("export", src, "-o", tmp_path / "pkg", "-t", "host", "-q", "fp32", "--max-seq-len", "32")
    assert_one_line_error(r, needle)
    assert not (tmp_path / "pkg").exists()
