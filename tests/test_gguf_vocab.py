"""GGUF vocabularies as llama.cpp's converter wrote them from the real tokenizers, against the token ids llama.cpp's
own tests expect: the `models/ggml-vocab-*.gguf` files of llama.cpp's source tree, each with `.inp` (test strings)
and `.out` (the ids llama.cpp must produce, written from the model's own Hugging Face tokenizer). They come with
llama-cpp-python's source distribution, which the test setup downloads (README: `pip download ... llama-cpp-python`).

Every vocabulary type is here: SentencePiece with a dummy prefix (Llama 2, Phi-3), byte-level BPE with each
pre-tokenizer llama.cpp names (Llama 3's with `ignore_merges`, Qwen2's, Qwen3.5's, GPT-2's, DeepSeek's, StarCoder's,
Falcon's, Command-R's, Refact's)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import write_tiny_gguf, write_tiny_hf

from mobilize.errors import MobilizeError
from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.sources.gguf_file import read_gguf
from mobilize.frontend.tokenizer import _from_gguf

SOURCE = Path(os.environ.get("MOBILIZE_LLAMA_CPP_SOURCE", Path(sys.prefix) / "llama-cpp-src"))
RELEASE = "llama_cpp_python-0.3.36"
SEPARATOR = "\n__ggml_vocab_test__\n"
# every ggml-vocab file with expected ids but MPT's (GPT-NeoX's vocabulary, not a family mobilize exports: its runs
# of spaces are user-defined tokens spelled in plain text, which a byte-level tokenizer.json cannot hold under
# the file's ids) and Gemma 4's and BERT's (other tokenizer models)
FAST = ["llama-spm", "llama-bpe"]
SLOW = ["qwen2", "qwen35", "phi-3", "gpt-2", "deepseek-llm", "deepseek-coder", "starcoder", "falcon", "command-r",
        "refact"]  # fmt: skip


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    archive = SOURCE / f"{RELEASE}.tar.gz"
    assert archive.is_file(), f"{archive} is missing: the test setup downloads it (see the README)"
    out = tmp_path_factory.mktemp("llama-cpp-vocab")
    prefix = f"{RELEASE}/vendor/llama.cpp/models/ggml-vocab-"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.startswith(prefix) and member.isfile():
                (out / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return out


def _cases(vocab_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    texts = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    if texts[-1].endswith(SEPARATOR.rstrip("\n")):  # the file ends with a separator and no newline
        texts[-1] = texts[-1][: -len(SEPARATOR.rstrip("\n"))]
    ids = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return list(zip(texts, ([int(x) for x in line.split()] for line in ids), strict=False))


def _tokenizer(vocab_dir: Path, name: str, out: Path, **changes):
    from tokenizers import Tokenizer

    meta, _ = read_gguf(str(vocab_dir / f"ggml-vocab-{name}.gguf"))
    out.mkdir()
    _from_gguf(f"ggml-vocab-{name}.gguf", {**meta, **changes}, out)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


@pytest.mark.parametrize("name", [*FAST, *(pytest.param(n, marks=pytest.mark.slow) for n in SLOW)])
def test_vocabulary_encodes_as_llama_cpp(vocab_dir, name, tmp_path):
    """The package's tokenizer.json, built from the GGUF's keys, encodes every test string of llama.cpp's into the
    ids llama.cpp's test expects (special tokens off, as that test runs)."""
    cases = _cases(vocab_dir, name)
    assert len(cases) >= 40
    tok = _tokenizer(vocab_dir, name, tmp_path / "tok")
    got = {text: tok.encode(text, add_special_tokens=False).ids for text, _ in cases}
    wrong = [(text, want, got[text]) for text, want in cases if got[text] != want]
    assert not wrong, wrong[:3]


def test_unknown_pre_tokenizer_is_refused_in_one_line(vocab_dir, tmp_path):
    """A byte-level vocabulary whose pre-tokenizer name llama.cpp does not know is refused, naming it: encoding most
    text right and some wrong would go unnoticed."""
    with pytest.raises(MobilizeError) as e:
        _tokenizer(vocab_dir, "llama-bpe", tmp_path / "tok", **{"tokenizer.ggml.pre": "made-up-pre"})
    message = str(e.value)
    assert "\n" not in message and "'made-up-pre' (tokenizer.ggml.pre)" in message and "llama-bpe" in message


def test_unknown_pre_tokenizer_stops_the_export_first(vocab_dir, tmp_path):
    """Through the CLI, a GGUF whose byte-level vocabulary names an unknown pre-tokenizer is refused before the
    export loads or writes anything (the refusal does not wait for the tokenizer's turn)."""
    from helpers import assert_one_line_error, cli

    meta, _ = read_gguf(str(vocab_dir / "ggml-vocab-qwen2.gguf"))
    vocab = {k: v for k, v in meta.items() if k.startswith("tokenizer.")} | {"tokenizer.ggml.pre": "made-up-pre"}
    cfg = dataclasses.replace(FAMILIES["qwen2"].tiny(), vocab_size=len(vocab["tokenizer.ggml.tokens"]))
    gguf = write_tiny_gguf(cfg, write_tiny_hf(cfg, tmp_path / "hf"), tmp_path / "q.gguf", vocab=vocab)
    r = cli("export", gguf, "-o", tmp_path / "pkg", "-t", "host", "-q", "fp32", "--max-seq-len", "32")
    assert_one_line_error(r, "'made-up-pre' (tokenizer.ggml.pre)", "qwen2")
    assert "lowering" not in r.stdout + r.stderr and not (tmp_path / "pkg").exists()


@pytest.mark.slow
def test_llama3_vocabulary_gguf_exports_and_genai_agrees(vocab_dir, tmp_path):
    """A tiny Llama 3.2-shaped GGUF (tied head) carrying Llama 3's real vocabulary keys as llama.cpp's converter
    wrote them: the ONNX export passes its tokenizer parity check against GenAI's tokenizer, and the package's
    tokenizer encodes llama.cpp's test strings as llama.cpp does, with the BOS the file asks for."""
    from tokenizers import Tokenizer

    from mobilize.driver import ExportOptions, export

    meta, _ = read_gguf(str(vocab_dir / "ggml-vocab-llama-bpe.gguf"))
    vocab = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    cfg = dataclasses.replace(FAMILIES["llama"].tiny(), vocab_size=len(vocab["tokenizer.ggml.tokens"]),
                              tie_word_embeddings=True)  # fmt: skip
    hf = write_tiny_hf(cfg, tmp_path / "hf")
    gguf = write_tiny_gguf(cfg, hf, tmp_path / "llama3.gguf", vocab=vocab)
    pkg = export(ExportOptions(str(gguf), tmp_path / "pkg", target="host", quant="fp32", max_seq_len=64))
    parity = json.loads((pkg / "manifest.json").read_text())["tokenizer_parity"]["genai"]
    assert "strings encode the same" in parity, parity
    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    for text, want in _cases(vocab_dir, "llama-bpe"):
        assert tok.encode(text).ids == [128000, *want], text
