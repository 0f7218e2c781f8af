"""The command line end to end: inspect (text and JSON) and the plain fp32 export package."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mobilize.harness.reference import ReferenceRunner
from mobilize.harness.runner import greedy, score
from mobilize.targets.onnx.runner import OrtRunner

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_inspect_json_tiny(tiny_hf):
    r = _cli("inspect", str(tiny_hf("gemma3")), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "gemma3" and info["layers"] == 6 and info["sliding_window_layers"] == 5
    assert info["tensor_dtypes"] == {"F32": 6 * 13 + 2}
    assert info["parameters"] == sum(info["tensor_bytes_by_dtype"].values()) // 4
    assert info["bytes_on_disk"] > info["tensor_bytes_by_dtype"]["F32"]


def test_inspect_bundled_gemma():
    r = _cli("inspect", "gemma3-270m")
    assert r.returncode == 0, r.stderr
    assert "gemma3" in r.stdout and "18 (15 sliding-window, window 512)" in r.stdout
    assert "Q4_K x27" in r.stdout and "268,098,176" in r.stdout


def test_export_package_runs(tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    r = _cli("export", str(tiny_hf("qwen2")), "--out", str(out), "-q", "fp32")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.onnx.data",
        "generation_config.json",
        "genai_config.json",
        "README.md",
    }
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    prompt = [5, 6, 7, 8]
    np.testing.assert_allclose(
        score(OrtRunner(out / "model.onnx"), prompt), ReferenceRunner(tiny_hf("qwen2")).prefill(prompt), atol=1e-4
    )
    again = _cli("export", str(tiny_hf("qwen2")), "--out", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert _cli("export", str(tiny_hf("qwen2")), "--out", str(out), "--overwrite").returncode == 0


def test_export_int4_package(tiny_hf, tmp_path):
    """--quant int4: every linear layer becomes 4-bit MatMulNBits (q/k/v and gate/up packed), the tied head too
    (the ONNX head is split by calibration where the source has a tokenizer to rank its input channels with; this
    one has none, so the recipe's plain 4-bit head), the embedding a 4-bit lookup; from float values, blocks of 64
    (fp32 scales and zero points: the recipe's 4.6 bits per weight); the report says so."""
    import onnx

    out = tmp_path / "pkg4"
    r = _cli("export", str(tiny_hf("gemma3")), "--out", str(out), "--quant", "int4")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "int4"
    passes = {p["pass"].split("(")[0]: p for p in manifest["build_report"]["passes"]}
    head, body, embedding = passes["quantize_matmul[head]"], passes["quantize_matmul"], passes["quantize_embedding"]
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert embedding["matched"] == 1 and "GatherBlockQuantized" in {n.op_type for n in m.graph.node}
    assert head["matched"] == 1 and head["tensors"][0]["weight"] == "model.embed_tokens.weight"
    assert head["tensors"][0]["block_size"] == 64 and head["tensors"][0]["bits"] == 4
    assert embedding["tensors"][0]["plan"]["bits"] == 4 and embedding["tensors"][0]["plan"]["block_size"] == 64
    assert passes["pack_matmul"]["matched"] == 6 * 2
    assert body["matched"] == 6 * 4 and body["rel_rms_error"]["max"] < 0.2
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    assert bits == [4] * 25
    prompt = [5, 6, 7, 8, 9, 10]
    ref = ReferenceRunner(tiny_hf("gemma3")).prefill(prompt)

    def rel_error(package: Path) -> float:
        got = score(OrtRunner(package / "model.onnx"), prompt)
        return float(np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean()))

    assert _cli("export", str(tiny_hf("gemma3")), "--out", str(tmp_path / "pkg8"), "--quant", "int8").returncode == 0
    # A random tiny net amplifies weight noise; the ordering and int8's closeness are what must hold.
    int4, int8 = rel_error(out), rel_error(tmp_path / "pkg8")
    assert 0 < int8 < 0.05 and int8 < int4 < 1.0, (int8, int4)


def test_unknown_recipe(tiny_hf, tmp_path):
    r = _cli("export", str(tiny_hf("llama")), "--out", str(tmp_path / "x"), "--quant", "int3")
    assert r.returncode == 1 and "unknown quantization recipe 'int3'" in r.stderr
    assert not (tmp_path / "x").exists()


def test_tflite_only_recipe_refused_for_onnx(tiny_hf, tmp_path):
    r = _cli("export", str(tiny_hf("llama")), "--out", str(tmp_path / "x"), "--quant", "int4-channel")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "mobilize: error: recipe 'int4-channel' has no onnx form: its linear layers are 4-bit with one scale per "
        "output channel, which onnx cannot store"
    ]
    assert not (tmp_path / "x").exists()


def test_run_streams_text_from_an_hf_package(tiny_hf, tmp_path):
    """A package from a HF directory carries its tokenizer; `mobilize run` decodes with our runner."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "with_tok"
    import shutil

    shutil.copytree(tiny_hf("llama"), src)
    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    out = tmp_path / "pkg"
    assert _cli("export", str(src), "--out", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == ["tokenizer.json", "generation_config.json"]
    r = _cli("run", str(out), "--prompt", "w3 w17 w99", "-n", "5")
    assert r.returncode == 0, r.stderr
    expected = greedy(OrtRunner(out / "model.onnx"), [3, 17, 99], 5)
    assert r.stdout.split() == ["w3", "w17", "w99"] + [f"w{t}" for t in expected]
    assert _cli("run", str(tmp_path), "--prompt", "x").stderr.startswith("mobilize: error: ")


def test_bench_json(tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    assert _cli("export", str(tiny_hf("llama")), "--out", str(out), "-q", "int4").returncode == 0
    r = _cli("bench", str(out), "--prompt-len", "16", "--gen-len", "8", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    pp, tg = result["records"]
    assert (pp["test"], pp["n_tokens"], tg["test"], tg["n_tokens"]) == ("pp16", 16, "tg8", 8)
    assert len(pp["samples_ts"]) == 2 and min(pp["samples_ts"]) <= pp["avg_ts"] <= max(pp["samples_ts"])
    assert result["decode_tokens_per_s"] == tg["avg_ts"] > 0 and result["time_to_first_token_s"] > 0
    assert result["peak_rss_bytes"] > 10 * 2**20 and result["recipe"] == "int4"
    r = _cli("bench", str(out), "--prompt-len", "8", "--gen-len", "4", "--repeats", "1", "--runtime", "genai", "--json")
    assert r.returncode == 0, r.stderr
    genai = json.loads(r.stdout)
    assert genai["runtime"] == "genai" and genai["decode_tokens_per_s"] > 0
    r = _cli("bench", str(out), "--runtime", "litert-lm")  # an ONNX package
    assert r.returncode == 1 and r.stderr.strip() == (
        "mobilize: error: --runtime litert-lm runs tflite packages; this one is onnx"
    ), r.stderr


def test_export_std_opset_matches_reference(tiny_hf, tmp_path):
    """--opset std: only standard ONNX ops (opset 23), a growing cache, the same logits as transformers."""
    import onnx

    out = tmp_path / "std"
    r = _cli("export", str(tiny_hf("qwen2")), "--out", str(out), "-q", "fp32", "--opset", "std")
    assert r.returncode == 0, r.stderr
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.domain for n in m.graph.node} == {""} and {"Attention", "RMSNormalization"} <= {
        n.op_type for n in m.graph.node
    }
    assert json.loads((out / "manifest.json").read_text())["kv_cache"] == {"layout": "dynamic"}
    runner = OrtRunner(out / "model.onnx")
    assert not runner.static
    prompt = [5, 6, 7, 8]
    np.testing.assert_allclose(score(runner, prompt), ReferenceRunner(tiny_hf("qwen2")).prefill(prompt), atol=1e-4)


def test_logits_of_the_last_position_by_default_of_all_on_request(tiny_hf, tmp_path):
    """ONNX packages give the last position's logits (a prompt's head costs one token's); --logits all gives
    every position's. Both score alike (ours token by token), and GenAI runs the last-only one greedily as
    our runner does."""
    from helpers import genai_greedy

    src = str(tiny_hf("gemma3"))
    last, every = tmp_path / "last", tmp_path / "all"
    assert _cli("export", src, "--out", str(last), "-q", "fp32").returncode == 0
    assert _cli("export", src, "--out", str(every), "-q", "fp32", "--logits", "all").returncode == 0
    shapes = {}
    for package in (last, every):
        manifest = json.loads((package / "manifest.json").read_text())
        shapes[package.name] = next(o["shape"] for o in manifest["io"]["outputs"] if o["name"] == "logits")
        assert manifest["target"]["logits"] == package.name
    assert shapes == {"last": ["batch", 1, 128], "all": ["batch", "seq", 128]}
    prompt = [3, 17, 99, 5, 64, 1, 42]
    ours_last, ours_all = OrtRunner(last / "model.onnx"), OrtRunner(every / "model.onnx")
    assert ours_last.prefill(prompt).shape == (1, 128) and ours_all.prefill(prompt).shape == (len(prompt), 128)
    np.testing.assert_allclose(score(ours_last, prompt), score(ours_all, prompt), atol=1e-4, rtol=0)
    assert genai_greedy(last, prompt, 8) == greedy(ours_last, prompt, 8) == greedy(ours_all, prompt, 8)
    bad = _cli("export", src, "--out", str(tmp_path / "t"), "-f", "tflite", "--logits", "all")
    assert bad.returncode == 1 and "--logits all is for ONNX" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "pkg", "-n", "0"], "Invalid value for '--max-new-tokens'"),
        (["run", "pkg"], "Missing option '--prompt'"),
        (["export", "x", "--bogus"], "No such option: --bogus"),
        (["export", "x", "--max-seq-len", "abc"], "Invalid value for '--max-seq-len'"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line(args, expected):
    """Whatever click typer brings (typer 0.29 bundles its own), a usage error is one line and exit 1."""
    r = _cli(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mobilize: error: ") and expected in lines[0], r.stderr
