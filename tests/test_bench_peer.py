"""The benchmark's peer path on a tiny model: ONNX Runtime GenAI's own builder (behind the flat-rope
wrapper) exports our tiny Gemma 3 checkpoint, and the two runners the benchmark uses (ONNX Runtime GenAI
for speed, our onnxruntime runner for perplexity) give the same tokens on its package and on ours.

(On this random tiny Gemma 3 the builder's fp32 logits differ from transformers' by about 2 already at
the first position, where rotary is the identity, so it is not the rope wrapper; on the real model its
package writes sensible text. Our package matches transformers to 1e-4: tests/test_families.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mobilize.bench.peers.genai_builder import build
from mobilize.harness.runner import greedy
from mobilize.targets.onnx.genai_runner import GenAIRunner
from mobilize.targets.onnx.runner import OrtRunner


@pytest.mark.slow  # (over 5 s: out of the fast subset)
def test_builder_package_and_ours_agree(tiny_hf, tmp_path):
    src = tiny_hf("gemma3")
    peer = tmp_path / "peer"
    timing = build(src, peer, tmp_path / "cache", precision="fp32")
    assert timing["wall_s"] > 0 and timing["peak_rss_bytes"] > 50 * 2**20
    ours = tmp_path / "ours"
    r = subprocess.run(
        [sys.executable, "-m", "mobilize.cli", "export", str(src), "--out", str(ours), "-q", "fp32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    prompt = [3, 17, 99, 5, 64, 1, 42]
    ours_tokens = greedy(OrtRunner(ours / "model.onnx"), prompt, 12)
    assert greedy(GenAIRunner(ours), prompt, 12) == ours_tokens
    peer_tokens = greedy(GenAIRunner(peer, max_length=256), prompt, 12)
    assert greedy(OrtRunner(peer / "model.onnx"), prompt, 12) == peer_tokens  # symbolic shared buffers sized


def test_pytorch_eager_peer_is_measured_like_a_package(tiny_hf):
    """The PyTorch-eager peer runs behind the Runner protocol and is timed by the same harness."""
    from mobilize.bench.peers.pytorch_eager import pytorch_eager_runner
    from mobilize.harness.perf import measure

    m = measure(pytorch_eager_runner(tiny_hf("qwen2"), threads=2), 128, prompt_len=8, gen_len=4, repeats=2)
    assert [r["test"] for r in m["records"]] == ["pp8", "tg4"]
    assert m["prefill_tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0


def test_interleaved_rounds_alternate_order_and_ratios_pair_by_round():
    from mobilize.harness.perf import interleaved, paired_ratio

    calls = []

    def contender(name, rates):
        def run():
            calls.append(name)
            rate = rates[len([c for c in calls if c == name]) - 1]
            return {"time_to_first_token_s": 1 / rate, "prefill_tokens_per_s": rate, "decode_tokens_per_s": rate}

        return run

    # the machine's load moves both in each round; b is 10% faster than a in every round
    a, b = [100.0, 50.0, 80.0, 40.0], [110.0, 55.0, 88.0, 44.0]
    res = interleaved({"a": contender("a", a), "b": contender("b", b)}, 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert res["b"]["samples"]["tg"] == b and res["a"]["decode_tok_s"] == 65.0
    assert paired_ratio(res["b"]["samples"]["tg"], res["a"]["samples"]["tg"]) == pytest.approx(1.1)


def test_export_runs_reported_as_medians_with_their_samples():
    from mobilize.bench.onnx_vs_genai_builder import _median_run

    runs = [
        {"wall_s": 9.0, "peak_rss_bytes": 3},
        {"wall_s": 7.0, "peak_rss_bytes": 5},
        {"wall_s": 30.0, "peak_rss_bytes": 4},
    ]
    assert _median_run(runs) == {
        "wall_s": 9.0,
        "peak_rss_bytes": 4,
        "samples": {"wall_s": [9.0, 7.0, 30.0], "peak_rss_bytes": [3, 5, 4]},
    }
