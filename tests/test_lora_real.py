"""The real adapter (bench/adapters/gemma3-270m-skerrow: peft, rank 8 on q/v of the bundled Gemma 3 270M, trained on
Skerrow bulletins) in `int4`: on bulletins it never saw, the slots package with the adapter is far below the base
(the same session without it) and close to the fp32 reference with the adapter merged, and so is the merged package;
both write the domain's text, the base does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli

from mobilize.bench.lora_domain import EVAL_SEED, bulletins
from mobilize.bench.train_lora import DEFAULT_OUT as ADAPTER
from mobilize.harness.package import Package, stream_greedy

pytestmark = pytest.mark.slow
PROMPT = "Bulletin 1207 of the Skerrow Isles Coastwatch, issued at 0600 on the"


def _export(out: Path, fmt: str, *extra) -> Path:
    r = cli("export", "gemma3-270m", "-o", out, "-t", "host", "-q", "int4", "--max-seq-len", "512", "-f", fmt, *extra,
            timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_real_adapter(fmt, tmp_path):
    assert (ADAPTER / "adapter_model.safetensors").is_file()
    slots = _export(tmp_path / "slots", fmt, "--lora-slots", "8", "--lora-targets", "q,v")
    adapter = tmp_path / ("skerrow.onnx_adapter" if fmt == "onnx" else "skerrow.lora.tflite")
    assert cli("adapter", ADAPTER, "--package", slots, "-o", adapter).returncode == 0
    text = tmp_path / "eval.txt"
    text.write_text(bulletins(EVAL_SEED, 6))  # ~700 tokens

    def ev(*extra):
        r = cli("eval", slots, "--text", text, "--json", *extra, timeout=900)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    tuned, base = ev("--adapter", adapter), ev()
    assert tuned["perplexity"] < 0.6 * base["perplexity"], (tuned, base)
    # The adapter's path adds at most a point to the base's own int4 error, and both formats are within the +3% asked
    # (measured here: ONNX +2.1% with it, +1.7% without; TFLite +2.6% with, +3.9% without, its inputs smoothed)
    assert tuned["perplexity_increase"] < base["perplexity_increase"] + 0.01
    assert tuned["top1_agreement"] > 0.9
    assert tuned["perplexity_increase"] < 0.03

    merged = _export(tmp_path / "merged", fmt, "--lora", ADAPTER)
    pkg = Package.open(slots)
    runner = pkg.runner(0, [adapter])
    texts = [
        "".join(stream_greedy(pkg, PROMPT, 32, runner=runner)),
        "".join(stream_greedy(Package.open(merged), PROMPT, 32)),
    ]
    runner.activate(None)
    base_text = "".join(stream_greedy(pkg, PROMPT, 32, runner=runner))
    for t in texts:  # the bulletin's own words (the day name is a near tie: 0.18 logits between three in fp32)
        assert "Wind" in t and "Sea" in t, t
    assert "Wind" not in base_text, base_text
    # merged on the base's plan (calibrated and smoothed on the base, q and v stored as the base stores their type):
    # measured here ONNX +1.9% (top-1 90.0%), TFLite +3.3%; calibrated on the merged model it was +5.2% / +3.4% on the
    # bench's longer text
    r = cli("eval", merged, "--text", text, "--json", timeout=900)
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    assert figures["perplexity_increase"] < 0.04 and figures["top1_agreement"] > 0.88, figures


def _litert_lm_greedy(bundle: Path, adapter: Path, cache: Path, n: int) -> str:
    """LiteRT-LM's engine (a fresh one per adapter, closed after: an engine keeps the last adapter it bound) on the
    bundle with a LoRA file, greedy, no prompt template."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cache.mkdir(exist_ok=True)
    engine = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(thread_count=2), cache_dir=str(cache),
                              activation_data_type=litert_lm.ActivationDataType.FLOAT32)  # fmt: skip
    greedy = litert_lm.SamplerConfig(top_k=1, top_p=0.0, temperature=1.0, seed=0)
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=n, sampler_config=greedy,
                                    lora_config=litert_lm.LoraConfig(lora_path=str(adapter)))  # fmt: skip
    try:
        session.run_prefill([PROMPT])
        return session.run_decode().texts[0]
    finally:
        session.close()
        engine.close()


def test_litert_lm_runs_the_slots_and_the_adapter(tmp_path):
    """LiteRT-LM's engine on a TFLite slots package's bundle (rank 16, the engine's smallest): with the package's
    no-adapter.lora.tflite it writes the base model's text, with the real adapter the domain's; every token it picks,
    fed back through mobilize's runner with the same adapter, is within 1.5 logits of that runner's best (the two
    runtimes' int8 activations round differently: a near tie may break the other way)."""
    import numpy as np

    slots = _export(tmp_path / "slots", "tflite", "--lora-slots", "16", "--lora-targets", "q,v", "--bundle", "litertlm")
    skerrow = tmp_path / "skerrow.lora.tflite"
    assert cli("adapter", ADAPTER, "--package", slots, "-o", skerrow).returncode == 0
    pkg = Package.open(slots)
    tok = pkg.tokenizer()
    ids = tok.encode(PROMPT).ids
    texts = {}
    for name, adapter in (("base", slots / "no-adapter.lora.tflite"), ("skerrow", skerrow)):
        text = texts[name] = _litert_lm_greedy(slots / "model.litertlm", adapter, tmp_path / "cache", 24)
        theirs = tok.encode(text, add_special_tokens=False).ids
        assert len(theirs) >= 12, text
        runner = pkg.runner(2, [adapter])
        logits = np.atleast_2d(runner.prefill(ids))[-1]
        for t in theirs:
            assert logits.max() - logits[t] <= 1.5, (name, text, tok.decode([t]))
            logits = runner.decode(t).reshape(-1)
    assert "Wind" in texts["skerrow"] and "Wind" not in texts["base"], texts
