"""The command line end to end: inspect (text and JSON) and the plain fp32 export package."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mobilize.runtime_harness.ort_runner import OrtRunner
from mobilize.runtime_harness.reference import ReferenceRunner

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.compiler.cli", *args], capture_output=True, text=True, timeout=300
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
    r = _cli("export", str(tiny_hf("qwen2")), "--out", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data"}
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    prompt = [5, 6, 7, 8]
    np.testing.assert_allclose(
        OrtRunner(out / "model.onnx").prefill(prompt), ReferenceRunner(tiny_hf("qwen2")).prefill(prompt), atol=1e-4
    )
    again = _cli("export", str(tiny_hf("qwen2")), "--out", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert _cli("export", str(tiny_hf("qwen2")), "--out", str(out), "--overwrite").returncode == 0


def test_passes_and_targets_never_import_torch():
    """Layering: graph passes and target writers run without torch."""
    for folder in ("passes", "targets"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                )
                assert not any(n.split(".")[0] in ("torch", "transformers") for n in names), path
