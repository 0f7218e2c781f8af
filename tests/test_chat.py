"""Chat templates: carried from the source into the package where the runtimes read them (tokenizer_config.json's
chat_template), rendered and tokenized as transformers' apply_chat_template does, and `mobilize run --chat`."""

from __future__ import annotations

import json
import shutil
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
    """A tiny instruction-tuned llama: a BPE tokenizer with turn markers, its template in tokenizer_config.json
    or, as transformers 4.43+ saves it, in chat_template.jinja."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    shutil.copytree(tiny_hf("llama"), dst)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = Path(__file__).parents[1] / "src" / "mobilize" / "quant" / "data" / "calibration.txt"
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=128, special_tokens=specials, show_progress=False))
    tok.save(str(dst / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}  # fmt: skip
    if in_jinja:
        (dst / "chat_template.jinja").write_text(TEMPLATE)
    else:
        config["chat_template"] = TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = json.loads((dst / "config.json").read_text()) | {"bos_token_id": 1, "eos_token_id": 2}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "generation_config.json").unlink()
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
    """ONNX Runtime GenAI finds the template in the package and renders the same text (its tokenizer does not
    take this toy tokenizer's whitespace pre-tokenizer, so its ids are not compared here)."""
    import onnxruntime_genai as og

    src = _instruct(tiny_hf, tmp_path / "src", in_jinja=True)
    pkg = Package.open(export(ExportOptions(str(src), tmp_path / "pkg", quant="int8", max_seq_len=128)))
    tokenizer = og.Tokenizer(og.Model(str(pkg.path)))
    assert tokenizer.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True) == render(pkg, MESSAGES)


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
