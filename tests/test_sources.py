"""Checkpoint sources: sharded safetensors, quantized GGUF blocks, aliases from the HF cache, random weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.frontend.sources.gguf_file import read_gguf


def _weights(source) -> dict[str, np.ndarray]:
    model = load_model(open_checkpoint(str(source)))
    return {k: np.asarray(r.load()) for k, r in model.weights.items()}


def test_sharded_equals_single(tiny_hf, tmp_path):
    """Split the tiny checkpoint into two shards with an index, as save_pretrained does for big models."""
    from safetensors.numpy import load_file, save_file

    src = tiny_hf("qwen3")
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({n: tensors[n] for n in shard_names}, str(out / shard))
        weight_map |= {n: shard for n in shard_names}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = _weights(src), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bf16_and_f16_widen_exactly(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tiny_hf("llama")
    tensors = load_file(str(src / "model.safetensors"))
    out = tmp_path / "half"
    out.mkdir()
    shutil.copy(src / "config.json", out)
    half = {n: t.astype(np.float16) for n, t in tensors.items()}
    save_file(half, str(out / "model.safetensors"))
    got = _weights(out)
    for n, t in half.items():
        np.testing.assert_array_equal(got[n], t.astype(np.float32))


def test_gguf_f32_equals_hf(tiny_hf, tiny_gguf):
    """Through llama.cpp's layout (q/k row order, Gemma's +1 norms) and back: the same numbers."""
    for family in ("llama", "gemma3"):
        a, b = _weights(tiny_hf(family)), _weights(tiny_gguf(family))
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q5_0", "Q4_0"])
def test_quantized_gguf_blocks(qtype, tiny_hf, tmp_path):
    """A GGUF whose MLP weights are block-quantized loads within that format's rounding error."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import write_tiny_gguf

    cfg = FAMILIES["llama"].tiny()
    path = write_tiny_gguf(cfg, tiny_hf("llama"), tmp_path / "q.gguf", quant={"ffn_up.weight": qtype})
    meta, tensors = read_gguf(str(path))
    assert tensors["blk.0.ffn_up.weight"].dtype == qtype
    ref, got = _weights(tiny_hf("llama")), _weights(path)
    w, q = ref["model.layers.0.mlp.up_proj.weight"], got["model.layers.0.mlp.up_proj.weight"]
    bound = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.01, "Q5_0": 0.05, "Q4_0": 0.1}[qtype]
    assert 0 < np.abs(w - q).max() < bound * np.abs(w).max() * 4


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from(["Q8_0", "Q5_0", "Q4_0"]), st.floats(1e-3, 1e3))
def test_block_dequant_round_trip(rows, blocks, qtype, scale):
    """Round-trip property of ggml block formats through a GGUF file and our reader: every value
    within one quantization step of its block, and the shape back in numpy order."""
    import tempfile

    import gguf

    rng = np.random.default_rng(rows * 31 + blocks)
    w = (rng.standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/t.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_tensor("w", gguf.quants.quantize(w, qt), raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _, tensors = read_gguf(path)
        back = tensors["w"].load()
    assert back.shape == w.shape and tensors["w"].dtype == qtype
    # our vectorized Q8_0/Q5_0 decoding gives gguf's own values, bit for bit
    np.testing.assert_array_equal(back, gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).reshape(w.shape))
    bits = {"Q8_0": 8, "Q5_0": 5, "Q4_0": 4}[qtype]
    for b in range(blocks):
        blk = slice(32 * b, 32 * (b + 1))
        amax = np.abs(w[:, blk]).max(axis=1, keepdims=True)
        step = amax / (2 ** (bits - 1) - 1)
        assert (np.abs(w[:, blk] - back[:, blk]) <= step * 1.01 + 1e-6 * amax).all()


def test_real_gguf_tensor_table():
    """The bundled Gemma 3 270M: the block formats it really uses, all read."""
    ckpt = open_checkpoint("gemma3-270m")
    kinds = {r.dtype for r in ckpt.tensors.values()}
    assert kinds == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    emb = ckpt.tensors["token_embd.weight"]
    assert emb.shape == (262144, 640) and emb.nbytes == 262144 * 640 // 32 * 34
    q4k = next(r for r in ckpt.tensors.values() if r.dtype == "Q4_K").load()
    q6k = next(r for r in ckpt.tensors.values() if r.dtype == "Q6_K").load()
    for w in (q4k, q6k):
        assert w.dtype == np.float32 and np.isfinite(w).all() and 0.001 < w.std() < 1.0


def test_alias_from_local_hub_cache(tiny_hf, tmp_path, monkeypatch):
    """`smollm-135m` resolves offline to a snapshot in HF_HUB_CACHE, through the normal loader."""
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM-135M" / "snapshots" / "abc123"
    shutil.copytree(tiny_hf("llama"), snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model(open_checkpoint("smollm-135m"))
    assert model.config == FAMILIES["llama"].tiny()
    assert model.ckpt.source == "smollm-135m"


@pytest.mark.parametrize(
    "alias", ["llama-7b", "llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b", "smollm-135m", "gemma3-270m",
              "phi-3-mini-4k"]
)  # fmt: skip
def test_random_weights_real_shapes(alias):
    model = load_model(open_checkpoint(alias, random_weights=True))
    expected = {
        "llama-7b": 6.74e9,
        "llama-3.2-1b": 1.24e9,
        "qwen2.5-0.5b": 0.494e9,
        "qwen3-0.6b": 0.596e9,
        "mistral-7b": 7.24e9,
        "smollm-135m": 0.135e9,
        "gemma3-270m": 0.268e9,
        "phi-3-mini-4k": 3.82e9,
    }[alias]
    assert math.isclose(model.config.num_params, expected, rel_tol=0.01), model.config.num_params
    small = min(model.weights.values(), key=lambda r: math.prod(r.shape) if "norm" not in r.name else 1e18)
    a, b = small.load(), small.load()
    np.testing.assert_array_equal(a, b)  # deterministic
    assert a.shape == small.shape and 0.015 < a.std() < 0.025


def test_random_weights_from_a_config_dir(tiny_hf, tmp_path):
    """--random-weights with a directory needs only its config.json."""
    d = tmp_path / "cfg_only"
    d.mkdir()
    shutil.copy(tiny_hf("gemma3") / "config.json", d)
    model = load_model(open_checkpoint(str(d), random_weights=True))
    assert model.config == FAMILIES["gemma3"].tiny()
    assert model.weights["model.norm.weight"].load().sum() == 0  # Gemma's (1 + w): unit scale
