"""`mobilize eval`: figures against the reference model, recorded in the package, and a gate both ways."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import with_word_tokenizer


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_eval_figures_record_and_gate(tiny_hf, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from mobilize.harness.accuracy import log_softmax
    from mobilize.harness.reference import ReferenceRunner

    src = tmp_path / "src"
    shutil.copytree(tiny_hf("gemma3"), src)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="w1 $A", special_tokens=[("w1", 1)])  # a BOS
    tok.save(str(src / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, 128, 300)))
    out = tmp_path / "pkg"
    assert _cli("export", str(src), "--out", str(out), "-q", "int4").returncode == 0

    r = _cli("eval", str(out), "--text", str(text), "--chunk", "64", "--json", "--max-ppl-increase", "500%")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tokens"] == 300 and result["reference_perplexity"] > 1
    # chunks of 64 targets, each after the first read with the BOS before it (its own row not scored)
    ids, ref, nll = tok.encode(text.read_text()).ids, ReferenceRunner(src), 0.0
    for start in range(0, 300, 64):
        piece = ids[start : start + 65]
        context, targets = ([1] if start else []) + piece[:-1], piece[1:]
        nll -= log_softmax(ref.prefill(context))[-len(targets) :][np.arange(len(targets)), targets].sum()
    assert abs(result["reference_perplexity"] / np.exp(nll / 300) - 1) < 1e-5
    assert 0 < result["top1_agreement"] <= 1 and result["mean_kl"] > 0  # int4 of a random net: not identical
    assert abs(result["perplexity"] / result["reference_perplexity"] - 1 - result["perplexity_increase"]) < 1e-9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["evaluation"] == result and "## Evaluation" in (out / "README.md").read_text()
    assert _cli("verify", str(out)).returncode == 0  # the README's new hash was recorded

    # transformers as the reference instead (independent of our decoder): the same figures to ~1e-5
    r = _cli("eval", str(out), "--text", str(text), "--chunk", "64", "--json", "--reference", "transformers")
    assert r.returncode == 0, r.stderr
    hf = json.loads(r.stdout)
    assert hf["reference"] == "transformers" and result["reference"] == "numpy"
    assert abs(hf["reference_perplexity"] / result["reference_perplexity"] - 1) < 1e-5
    assert abs(hf["top1_agreement"] - result["top1_agreement"]) < 0.01

    budget = result["perplexity_increase"] * 100 - 0.5  # just under what it measured: the gate closes
    r = _cli("eval", str(out), "--text", str(text), "--chunk", "64", "--max-ppl-increase", f"{budget}%",
             "--reference", "transformers")  # fmt: skip
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "exceeds the budget" in lines[0], r.stderr


@pytest.mark.slow
def test_eval_refuses_random_weights(tmp_path):
    out = tmp_path / "pkg"
    assert _cli("export", "gemma3-270m", "--random-weights", "-q", "int8", "--out", str(out)).returncode == 0
    r = _cli("eval", str(out))
    assert r.returncode == 1 and r.stderr.strip().endswith("there is no reference model to compare"), r.stderr


def test_eval_needs_no_torch(tiny_hf, tmp_path):
    """From the quick-start install (no torch): the numpy reference; asking for transformers says what to install."""
    text = tmp_path / "text.txt"
    src = with_word_tokenizer(tiny_hf("llama"), tmp_path / "src", text, 100, seed=1)
    out = tmp_path / "pkg"
    assert _cli("export", str(src), "--out", str(out), "-q", "int8").returncode == 0
    no_torch = "import sys; sys.modules['torch'] = None; from mobilize.cli import main; main()"  # import torch fails
    run = [sys.executable, "-c", no_torch, "eval", str(out), "--text", str(text), "--chunk", "32", "--json"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["reference"] == "numpy" and result["tokens"] == 99 and result["top1_agreement"] > 0.9
    r = subprocess.run(run + ["--reference", "transformers"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "mobilize: error: --reference transformers needs torch (pip install 'mobilize[reference]'); "
        "the default numpy reference needs nothing more"
    ], r.stderr
