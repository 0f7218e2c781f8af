"""Benchmark suites: the CI suite runs for real and compares against the committed baseline with its
tolerances for noisy machines; compare catches an injected 20% regression and passes an unchanged run;
plots are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mobilize.bench.suite import METRICS, load_suite

BASELINE = Path(__file__).parent.parent / "src" / "mobilize" / "bench" / "baselines" / "ci.json"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("suite")
    r = _cli("bench", "run", "ci", "--out", str(d / "new.json"), "--workdir", str(d / "work"))
    assert r.returncode == 0, r.stderr
    assert "gemma3-270m/onnx/int4" in r.stdout and "gemma3-270m/tflite/int8" in r.stdout
    return d / "new.json"


def test_suite_expands_models_formats_recipes():
    suite = load_suite("recipes")
    assert sorted(c["id"] for c in suite["case"]) == sorted(
        f"gemma3-270m/{f}/{q}" for f in ("onnx", "tflite") for q in ("int4", "int8", "fp32")
    )
    scale = load_suite("export-scale")
    assert scale["measure"] == "export" and all(c["random_weights"] for c in scale["case"])
    assert [c["id"] for c in scale["case"]] == [
        f"{m}/{f}/int4" for m in ("llama-3.2-1b", "llama-7b") for f in ("onnx", "tflite")
    ]


@pytest.mark.slow
def test_ci_suite_against_the_committed_baseline(results):
    data = json.loads(results.read_text())
    assert [r["id"] for r in data["results"]] == ["gemma3-270m/onnx/int4", "gemma3-270m/tflite/int8"]
    for r in data["results"]:
        assert set(r["metrics"]) == set(METRICS) and all(v > 0 for v in r["metrics"].values())
        assert 10 < r["metrics"]["ppl"] < 30
    # The baseline was recorded on another machine: only what a machine does not change is compared with it
    # (speed is compared within one run: test_compare_catches_an_injected_regression, and the bench scripts).
    r = _cli("bench", "compare", str(BASELINE), str(results), "--metrics", "portable")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ppl" in r.stdout and "package_bytes" in r.stdout and "decode_tok_s" not in r.stdout
    assert "REGRESSION" not in r.stdout


@pytest.fixture
def recorded() -> Path:
    """A results file as `bench run ci` writes them: the committed baseline (the real run is the slow test)."""
    return BASELINE


def test_compare_catches_an_injected_regression(recorded, tmp_path):
    data = json.loads(recorded.read_text())
    data["tolerance"] = {}  # this run as its own baseline: every metric at --max-regression
    base = tmp_path / "base.json"
    base.write_text(json.dumps(data))
    assert _cli("bench", "compare", str(base), str(base), "--max-regression", "5%").returncode == 0

    data["results"][0]["metrics"]["decode_tok_s"] *= 0.8
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(data))
    r = _cli("bench", "compare", str(base), str(slower), "--max-regression", "5%")
    assert r.returncode == 1
    assert r.stderr.strip() == f"mobilize: error: 1 regression(s) against {base}"
    line = next(x for x in r.stdout.splitlines() if "REGRESSION" in x)
    assert "gemma3-270m/onnx/int4" in line and "decode_tok_s" in line and "-20.0%" in line
    # a tolerance for that metric lets it through
    assert _cli("bench", "compare", str(base), str(slower), "--tolerance", "decode_tok_s=25%").returncode == 0


def test_plots(recorded, tmp_path):
    r = _cli("bench", "plot", str(recorded), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["ci-perplexity-vs-size.png", "ci-tokens-per-s.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)


def test_suite_errors_are_one_line(tmp_path):
    r = _cli("bench", "run", "nope", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 1 and r.stderr.startswith("mobilize: error: no suite 'nope'") and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    r = _cli("bench", "compare", str(bad), str(bad))
    assert r.returncode == 1 and "is not a results file" in r.stderr and len(r.stderr.splitlines()) == 1
    r = _cli("bench", "compare", str(BASELINE), str(BASELINE), "--metrics", "ppl,speed")
    assert r.returncode == 1 and r.stderr.strip().startswith("mobilize: error: unknown metric 'speed'"), r.stderr
