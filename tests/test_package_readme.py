"""The code a TFLite package's README gives app developers runs as written (with the package's path and a prompt's
ids filled in) and generates the tokens mobilize's own runner generates. It once read `logits` from a prefill
signature, which has none."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import cli

from mobilize.harness.package import Package

IDS = [1, 17, 99, 5, 64, 3]


@pytest.mark.parametrize("kv,slots", [("float32", []), ("float16", []), ("float32", ["--lora-slots", "4"])])
def test_tflite_readme_code_runs(kv, slots, tiny_hf, tmp_path):
    """Also for a package with LoRA slots, whose signatures take the slots' inputs too (zeros: the base model)."""
    pkg = tmp_path / "pkg"
    r = cli("export", tiny_hf("llama"), "-o", pkg, "-f", "tflite", "-t", "host", "-q", "fp32", "--max-seq-len", "64",
            "--prefill-len", "8", "--kv-dtype", kv, *slots)  # fmt: skip
    assert r.returncode == 0, r.stderr
    code = re.search(r"```python\n(.*?)```", (pkg / "README.md").read_text(), re.S).group(1)
    assert code.count("path/to/this/package") == 1 and code.count("ids = [") == 1
    code = code.replace("path/to/this/package", str(pkg))
    code = re.sub(r"ids = \[[0-9, ]*\]", f"ids = {IDS}", code)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    runner = Package.open(pkg).runner()
    ours = [int(np.argmax(runner.prefill(IDS)[-1]))]
    while len(ours) < 16:
        ours.append(int(np.argmax(runner.decode(ours[-1]))))
    assert printed == ours
