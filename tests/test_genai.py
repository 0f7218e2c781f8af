"""ONNX Runtime GenAI runs our packages as they are, and its greedy tokens equal our runner's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import genai_greedy

from mobilize.harness.runner import greedy
from mobilize.targets.onnx.runner import OrtRunner


@pytest.mark.parametrize(
    ("family", "quant"), [("llama", "fp32"), ("gemma3", "int4"), ("qwen2", "int8"), ("phi3", "int4")]
)
def test_genai_matches_our_runner(family, quant, tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    r = subprocess.run(
        [sys.executable, "-m", "mobilize.cli", "export", str(tiny_hf(family)), "--out", str(out), "-q", quant],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "genai_config.json").read_text())
    assert (
        config["model"]["decoder"]["num_hidden_layers"]
        == json.loads((out / "manifest.json").read_text())["architecture"]["num_layers"]
    )
    prompt = [3, 17, 99, 5, 64, 1, 42]
    ours = greedy(OrtRunner(out / "model.onnx"), prompt, 12)
    assert genai_greedy(out, prompt, 12) == ours
