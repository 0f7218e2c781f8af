"""llama.cpp's GGUF LoRA adapters, as llama.cpp's own `convert_lora_to_gguf.py` writes them (from llama.cpp's source
as llama-cpp-python's source distribution ships it: `.ci/run` downloads it). A PEFT adapter converted by llama.cpp
gives, merged at export or converted for a package's slots, the logits of transformers + peft running the PEFT
original (1e-4, fp32), on every family (llama.cpp's q/k row order and phi3's fused projections included) and on a
GGUF base; a file that is no LoRA for this base is one error line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, assert_tracks_reference, cli, peft_targets, write_peft_adapter, write_tiny_hf

from mobilize.frontend.families.registry import FAMILIES
from mobilize.harness.package import Package
from mobilize.harness.reference import ReferenceRunner

SOURCE = Path(os.environ.get("MOBILIZE_LLAMA_CPP_SOURCE", Path(sys.prefix) / "llama-cpp-src"))
RELEASE = "llama_cpp_python-0.3.36"
PROMPT = [3, 17, 99, 5, 64, 1, 42]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def to_gguf(tmp_path_factory):
    """(Hugging Face base directory, PEFT adapter directory, out) -> the adapter converted by llama.cpp (f32)."""
    archive = SOURCE / f"{RELEASE}.tar.gz"
    assert archive.is_file(), f"{archive} is missing: the test setup downloads it (see the README)"
    root = tmp_path_factory.mktemp("llama-cpp-lora")
    prefix = f"{RELEASE}/vendor/llama.cpp/"
    wanted = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rel = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and member.isfile() and rel.startswith(wanted) and ".." not in rel:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(tar.extractfile(member).read())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def convert(hf: Path, peft: Path, out: Path) -> Path:
        cmd = [sys.executable, str(root / "convert_lora_to_gguf.py"), "--base", hf, "--outfile", out, peft]
        r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return out

    return convert


def _ok(r):
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_merged_gguf_lora_matches_peft(family, tiny_hf, to_gguf, tmp_path):
    """`export --lora X.gguf`: the package computes transformers + peft with the adapter llama.cpp converted."""
    hf = tiny_hf(family)
    peft = write_peft_adapter(hf, tmp_path / "peft", peft_targets(family, ALL))
    gguf = to_gguf(hf, peft, tmp_path / "lora.gguf")
    _ok(cli("export", hf, "-o", tmp_path / "pkg", "-t", "host", "-q", "fp32", "--max-seq-len", "64", "--lora", gguf))
    record = json.loads((tmp_path / "pkg" / "manifest.json").read_text())["source"]["adapters"][0]
    assert record["format"] == "gguf" and record["modules"] >= 7 * FAMILIES[family].tiny().num_layers
    assert_tracks_reference(ReferenceRunner(hf, adapters=[peft]), Package.open(tmp_path / "pkg").runner(), PROMPT)


def test_gguf_lora_in_slots_on_a_gguf_base(tiny_hf, tiny_gguf, to_gguf, tmp_path):
    """`mobilize adapter X.gguf --package` for a TFLite slots package of the GGUF base: the adapter's logits (the
    base's rows and the adapter's both in llama.cpp's q/k order, each put back)."""
    hf = tiny_hf("llama")
    peft = write_peft_adapter(hf, tmp_path / "peft", peft_targets("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]))
    gguf = to_gguf(hf, peft, tmp_path / "skerrow.gguf")
    pkg = tmp_path / "slots"
    _ok(cli("export", tiny_gguf("llama"), "-o", pkg, "-t", "host", "-q", "fp32", "--max-seq-len", "64", "-f", "tflite",
            "--prefill-len", "4", "--lora-slots", "4", "--lora-targets", "q,k,v,o"))  # fmt: skip
    out = _ok(cli("adapter", gguf, "--package", pkg)).stdout
    adapter = tmp_path / "skerrow.lora.tflite"  # named after the file, beside the package
    assert adapter.is_file() and "8 of the package's 8 slots, rank 4" in out, out
    runner = Package.open(pkg).runner(adapters=[adapter])
    assert_tracks_reference(ReferenceRunner(hf, adapters=[peft]), runner, PROMPT)


def test_not_a_lora_for_this_base_in_one_line(tiny_hf, tiny_gguf, to_gguf, tmp_path):
    hf = tiny_hf("llama")
    gguf = to_gguf(hf, write_peft_adapter(hf, tmp_path / "peft", peft_targets("llama", ALL)), tmp_path / "lora.gguf")
    wider = write_tiny_hf(dataclasses.replace(FAMILIES["llama"].tiny(), intermediate_size=96), tmp_path / "wider")
    other = to_gguf(wider, write_peft_adapter(wider, tmp_path / "wpeft", peft_targets("llama", ALL)),
                    tmp_path / "wider.gguf")  # fmt: skip
    cases = [
        (hf, tiny_gguf("llama"), ("a GGUF model", "not a LoRA adapter")),
        (tiny_hf("gemma3"), gguf, ("made for a 'llama' model", "gemma3")),
        (hf, other, ("do not fit rank 4", "another base model")),
    ]
    for base, lora, needles in cases:
        r = cli("export", base, "-o", tmp_path / "out", "-t", "host", "-q", "fp32", "--max-seq-len", "64",
                "--lora", lora)  # fmt: skip
        assert_one_line_error(r, *needles)
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_applies_a_gguf_lora_and_transformers_declines_it(tiny_hf, to_gguf, tmp_path):
    """`mobilize eval` of a package with a GGUF LoRA merged: the numpy reference merges it too (the package is
    exact in fp32); transformers + peft cannot read it, which is one line."""
    from helpers import with_word_tokenizer

    text = tmp_path / "text.txt"
    src = with_word_tokenizer(tiny_hf("llama"), tmp_path / "src", text, 80)
    gguf = to_gguf(src, write_peft_adapter(src, tmp_path / "peft", peft_targets("llama", ALL)), tmp_path / "a.gguf")
    pkg = tmp_path / "pkg"
    _ok(cli("export", src, "-o", pkg, "-t", "host", "-q", "fp32", "--max-seq-len", "64", "--lora", gguf))
    figures = json.loads(_ok(cli("eval", pkg, "--text", text, "--chunk", "32", "--json")).stdout)
    assert figures["mean_kl"] < 1e-6 and figures["top1_agreement"] == 1.0, figures
    r = cli("eval", pkg, "--text", text, "--chunk", "32", "--reference", "transformers")
    assert_one_line_error(r, "GGUF LoRA", "peft cannot read")


def _write_lora(out: Path, arch: str, tensors: dict, alpha: float | None = 8.0, **keys) -> Path:
    """A GGUF LoRA file written by hand (gguf's writer), for what llama.cpp's converter does not make."""
    import gguf

    w = gguf.GGUFWriter(str(out), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    for key, value in keys.items():
        w.add_array(key.replace("__", "."), value)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_hand_written_gguf_loras(tiny_hf, tmp_path):
    """llama.cpp's scale rule (alpha 0: scale 1; else alpha / rank), B's rows put back in q's rotary order, and the
    files no converter should write, each one line: LoRA on a norm, half a pair, an aLoRA, another architecture
    (Qwen2's adapter on Qwen3, though their layouts agree)."""
    from mobilize.frontend.families.common import permute_rotary
    from mobilize.frontend.loader import load_model, open_checkpoint
    from mobilize.frontend.lora import apply_adapters

    cfg = FAMILIES["llama"].tiny()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, cfg.hidden_size)), rng.standard_normal((cfg.q_size, 2))
    pair = {"blk.1.attn_q.weight.lora_a": a, "blk.1.attn_q.weight.lora_b": permute_rotary(b, cfg.num_heads)}
    model = load_model(open_checkpoint(str(tiny_hf("llama"))))
    q = "model.layers.1.self_attn.q_proj.weight"
    for alpha, scale in ((0.0, 1.0), (3.0, 1.5)):
        merged, _ = apply_adapters(model, [_write_lora(tmp_path / f"a{alpha}.gguf", "llama", pair, alpha)])
        np.testing.assert_allclose(merged.weights[q].load() - model.weights[q].load(), scale * b @ a, atol=1e-5)
    norm = {"blk.0.attn_norm.weight.lora_a": a, "blk.0.attn_norm.weight.lora_b": b[: cfg.hidden_size]}
    cases = [
        ("llama", _write_lora(tmp_path / "norm.gguf", "llama", norm), ("attn_norm", "not a linear layer")),
        ("llama", _write_lora(tmp_path / "half.gguf", "llama", {"blk.1.attn_q.weight.lora_a": a}),
         ("lora_a but not its other half",)),
        ("llama", _write_lora(tmp_path / "alora.gguf", "llama", pair, adapter__alora__invocation_tokens=[5, 6]),
         ("aLoRA", "not supported")),
        ("qwen3", _write_lora(tmp_path / "qwen2.gguf", "qwen2", pair), ("made for a 'qwen2' model", "qwen3")),
    ]  # fmt: skip
    for family, lora, needles in cases:
        r = cli("export", tiny_hf(family), "-o", tmp_path / "out", "-t", "host", "-q", "fp32", "--max-seq-len", "64",
                "--lora", lora)  # fmt: skip
        assert_one_line_error(r, *needles)
        assert not (tmp_path / "out").exists()
