"""Bad input gets one clear error line on stderr and exit code 1: never a traceback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mobilize: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_truncated_safetensors(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _assert_one_line_error(_cli("inspect", str(d)), "truncated")


def test_truncated_inside_header(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _assert_one_line_error(_cli("inspect", str(d)), "model.safetensors")


def test_header_offsets_past_file(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")

    def lie(h):
        name = "model.layers.1.mlp.down_proj.weight"
        h[name]["data_offsets"] = [h[name]["data_offsets"][0], 10**12]

    _rewrite_header(d / "model.safetensors", lie)
    _assert_one_line_error(_cli("inspect", str(d)), "down_proj", "header lies")


def test_overlapping_tensors(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")

    def overlap(h):
        a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
        h[b]["data_offsets"] = h[a]["data_offsets"]

    _rewrite_header(d / "model.safetensors", overlap)
    _assert_one_line_error(_cli("inspect", str(d)), "overlap")


def test_shape_disagrees_with_config(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(_cli("inspect", str(d)), "mlp", "[64, 96]", "config implies")


def test_missing_tensor(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    _rewrite_header(d / "model.safetensors", lambda h: h.pop("model.layers.1.self_attn.v_proj.weight"))
    _assert_one_line_error(_cli("inspect", str(d)), "missing", "model.layers.1.self_attn.v_proj.weight")


def test_leftover_tensor(tiny_hf, tmp_path):
    """A qwen2 checkpoint claimed to be llama: its q/k/v biases map to nothing."""
    d = _copy(tiny_hf("qwen2"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(_cli("inspect", str(d)), "map to nothing", "bias")


def test_unknown_model_type(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(_cli("inspect", str(d)), "'mamba'", "not supported")


def test_not_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    _assert_one_line_error(_cli("inspect", str(f)), "not a GGUF")


def test_gguf_absurd_dims(tiny_gguf, tmp_path):
    """Patch token_embd's first dim to 2**40: rejected from the table, before any allocation."""
    data = bytearray(tiny_gguf("llama").read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    assert n_dims == 2
    struct.pack_into("<Q", data, at + 4, 2**40)
    f = tmp_path / "absurd.gguf"
    f.write_bytes(bytes(data))
    _assert_one_line_error(_cli("inspect", str(f)), "token_embd.weight", "more elements than the file")


def test_gguf_truncated(tiny_gguf, tmp_path):
    data = tiny_gguf("gemma3").read_bytes()
    f = tmp_path / "cut.gguf"
    f.write_bytes(data[: len(data) - 1000])
    _assert_one_line_error(_cli("inspect", str(f)), "runs past the data section")


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_refused(tmp_path, suffix):
    f = tmp_path / f"pytorch_model{suffix}"
    f.write_bytes(b"\x80\x04\x95 not to be unpickled")
    _assert_one_line_error(_cli("inspect", str(f)), "pickle", "safetensors")


def test_unknown_alias_and_uncached_hub_model(tmp_path, monkeypatch):
    _assert_one_line_error(_cli("inspect", "no-such-model"), "known alias")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    _assert_one_line_error(_cli("inspect", "llama-7b"), "meta-llama/Llama-2-7b-hf", "--random-weights")


def test_export_failure_leaves_no_package(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    _rewrite_header(d / "model.safetensors", lambda h: h.pop("model.norm.weight"))
    out = tmp_path / "pkg"
    _assert_one_line_error(_cli("export", str(d), "--out", str(out)), "model.norm.weight")
    assert not out.exists() and not list(tmp_path.glob(".pkg.partial-*"))


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("num_hidden_layers", 10**9, "num_hidden_layers=1000000000"),
        ("hidden_size", "wide", "hidden_size='wide'"),
        ("num_attention_heads", None, "lacks 'num_attention_heads'"),
        ("num_key_value_heads", 3, "not a multiple"),
    ],
)
def test_absurd_config_values(tiny_hf, tmp_path, field, value, needle):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(_cli("inspect", str(d)), needle)


def test_config_not_json(tiny_hf, tmp_path):
    d = _copy(tiny_hf("llama"), tmp_path / "m")
    (d / "config.json").write_text("[" * 100000)
    _assert_one_line_error(_cli("inspect", str(d)), "config.json")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--target", "watch"], "unknown target 'watch'"),
        (["--format", "coreml"], "format 'coreml' is not available"),
        (["--prefill-len", "0"], "--prefill-len [0]"),
        (["--max-seq-len", "0"], "--max-seq-len 0 is out of range"),
        (["--max-seq-len", "100000"], "past the model's context of 256"),
        (["--opset", "23"], "unknown --opset '23'"),
    ],
)
def test_export_option_errors(flags, needle, tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    _assert_one_line_error(_cli("export", str(tiny_hf("llama")), "--out", str(out), *flags), needle)
    assert not out.exists() and not list(tmp_path.glob(".pkg.partial-*"))
