"""Chat templates: carried from the source into the package where the runtimes read them (tokenizer_config.json's
chat_template), rendered and tokenized as transformers' apply_chat_template does, and `mobilize run --chat`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mobilize.driver import ExportOptions, export
from mobilize.harness.chat import chat_ids, end_of_turn_ids, render
from mobilize.harness.package import Package

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "the river is long"},
    {"role": "assistant", "content": "yes it is"},
    {"role": "user", "content": "and wide"},
]


def _instruct(tiny_hf, dst: Path, in_jinja: bool) -> Path:
    """A tiny instruction-tuned llama with a byte-level BPE tokenizer and turn markers (helpers.write_tiny_bpe), its
    template in tokenizer_config.json or, as transformers 4.43+ saves it, in chat_template.jinja."""
    from helpers import write_tiny_bpe

    write_tiny_bpe("llama", dst)
    if in_jinja:
        (dst / "chat_template.jinja").write_text(TEMPLATE)
    else:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    return dst


@pytest.mark.parametrize("in_jinja", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_chat_prompt_ids_are_transformers(in_jinja, tiny_hf, tmp_path):
    from transformers import AutoTokenizer

    src = _instruct(tiny_hf, tmp_path / "src", in_jinja)
    want = AutoTokenizer.from_pretrained(str(src)).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    pkg = Package.open(export(ExportOptions(str(src), tmp_path / "pkg", quant="int8", max_seq_len=128)))
    assert json.loads((pkg.path / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert chat_ids(pkg, MESSAGES) == want
    assert end_of_turn_ids(pkg) == {5}  # <|end|>: a reply stops there


def test_genai_renders_the_packages_template_as_we_do(tiny_hf, tmp_path):
    """ONNX Runtime GenAI finds the template in the package and renders the same text, and its tokenizer gives
    that text the prompt ids transformers' apply_chat_template gives (the template holds the BOS, so special
    tokens stay off, GenAI's default); the export checked GenAI's tokenizer on its own strings too."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    src = _instruct(tiny_hf, tmp_path / "src", in_jinja=True)
    want = AutoTokenizer.from_pretrained(str(src)).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    pkg = Package.open(export(ExportOptions(str(src), tmp_path / "pkg", quant="int8", max_seq_len=128)))
    parity = json.loads((pkg.path / "manifest.json").read_text())["tokenizer_parity"]
    assert "strings encode the same" in parity["genai"]
    tokenizer = og.Tokenizer(og.Model(str(pkg.path)))
    text = tokenizer.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert text == render(pkg, MESSAGES)
    assert [int(t) for t in tokenizer.encode(text)] == want


def test_run_chat_is_multi_turn(tiny_hf, tmp_path):
    src = _instruct(tiny_hf, tmp_path / "src", in_jinja=False)
    pkg = export(ExportOptions(str(src), tmp_path / "pkg", quant="int8", max_seq_len=128))
    r = subprocess.run([sys.executable, "-m", "mobilize.cli", "run", str(pkg), "--chat", "-n", "8"],
                       input="the river is long\nand wide\n", capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout.splitlines()) == 2  # one reply per turn
    bare = _instruct(tiny_hf, tmp_path / "bare", in_jinja=True)
    (bare / "chat_template.jinja").unlink()  # a base model: a tokenizer, no template
    plain = export(ExportOptions(str(bare), tmp_path / "plain", quant="int8", max_seq_len=32))
    r = subprocess.run([sys.executable, "-m", "mobilize.cli", "run", str(plain), "--chat", "-p", "hi"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "no chat template" in r.stderr, r.stderr


def test_a_tokenizer_genai_reads_otherwise_stops_the_export(tiny_hf, tmp_path):
    """tokenizer.json adds the BOS, tokenizer_config.json says not to and names no tokenizer class: GenAI's
    tokenizer then appends an EOS too, so an app would feed the model other ids than mobilize checked. The export
    stops in one line naming a string and the ids; --ignore-tokenizer-parity writes it, and the manifest says so."""
    from helpers import assert_one_line_error, cli
    from tokenizers import Tokenizer, processors

    src = _instruct(tiny_hf, tmp_path / "src", in_jinja=True)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(src / "tokenizer.json"))
    config = json.loads((src / "tokenizer_config.json").read_text()) | {"add_bos_token": False}
    del config["tokenizer_class"]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    args = ["export", src, "-o", tmp_path / "pkg", "-q", "fp32", "--max-seq-len", "32"]
    assert_one_line_error(cli(*args), "tokenizer parity", "ONNX Runtime GenAI encodes", "--ignore-tokenizer-parity")
    assert not (tmp_path / "pkg").exists()
    r = cli(*args, "--ignore-tokenizer-parity")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["tokenizer_parity"] == {"skipped": "--ignore-tokenizer-parity"}


def test_litert_lm_tokenizes_as_the_package(tiny_hf, tmp_path):
    """A TFLite export with its LiteRT-LM bundle checks the engine's own tokenizer against tokenizer.json, with the
    BOS the engine puts before a session's prompt: the bundle names a start token only if the tokenizer adds one
    (this one names `<s>` as BOS and never adds it, as Qwen's files do with `<|endoftext|>`). A tokenizer.json
    that then adds a BOS the bundle does not is one line from the check."""
    from tokenizers import Tokenizer, processors

    from mobilize.errors import MobilizeError
    from mobilize.targets.tflite.tokenizer_parity import check_with_litert_lm

    src = _instruct(tiny_hf, tmp_path / "src", in_jinja=True)
    opts = dict(format="tflite", quant="fp32", max_seq_len=64, bundle="litertlm")
    pkg = export(ExportOptions(str(src), tmp_path / "pkg", **opts))
    parity = json.loads((pkg / "manifest.json").read_text())["tokenizer_parity"]
    assert "strings encode the same" in parity["litert-lm"], parity
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(src / "tokenizer.json"))
    with_bos = export(ExportOptions(str(src), tmp_path / "bos", **opts))  # now the bundle names <s>: the same again
    parity = json.loads((with_bos / "manifest.json").read_text())["tokenizer_parity"]
    assert "strings encode the same" in parity["litert-lm"], parity
    tok.save(str(pkg / "tokenizer.json"))  # the first bundle (no start token) beside a tokenizer that adds one
    with pytest.raises(MobilizeError) as e:
        check_with_litert_lm(pkg)
    assert "\n" not in str(e.value) and "LiteRT-LM encodes" in str(e.value), e.value
