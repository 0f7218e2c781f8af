"""Tokenizer files built from a GGUF's vocabulary: Gemma's SentencePiece vocabularies by our own builder,
which must give the tokenizer.json transformers' GGUF builder gives, byte for byte."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobilize.errors import MobilizeError
from mobilize.frontend import tokenizer as tok_module

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _meta(pieces: list[str], user_defined: list[str] = ()) -> dict:
    tokens = SPECIALS + BYTES + list(pieces) + list(user_defined)
    types = [3] * len(SPECIALS) + [6] * len(BYTES) + [1] * len(pieces) + [4] * len(user_defined)
    return {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def _both(meta: dict, tmp_path, monkeypatch) -> tuple[bytes, bytes]:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(exist_ok=True)
    theirs.mkdir(exist_ok=True)
    tok_module._from_gguf("tiny.gguf", meta, ours)
    with monkeypatch.context() as m:
        m.setattr(tok_module, "_is_sentencepiece", lambda meta: False)  # transformers' builder
        tok_module._from_gguf("tiny.gguf", meta, theirs)
    return (ours / "tokenizer.json").read_bytes(), (theirs / "tokenizer.json").read_bytes()


def test_gemma_vocabulary_built_as_transformers_builds_it(tmp_path, monkeypatch):
    """Merges from every split of a token into two tokens, ranked by the merged token's position; spaces
    tokens respelled; a repeated token; control and user-defined tokens kept whole."""
    pieces = ["\u2581", "t", "h", "e", "he", "\u2581t", "\u2581the", "the", "  ", "   ", "in", "\u2581in",
              "g", "ing", "\u2581th", "th", "e", "\u2581thing", "hin", "thin"]  # fmt: skip
    meta = _meta(pieces, user_defined=["<start_of_turn>"])
    ours, theirs = _both(meta, tmp_path, monkeypatch)
    assert ours == theirs
    spec = json.loads(ours)
    assert spec["model"]["merges"][:5] == [
        ["h", "e"],
        ["\u2581", "t"],
        ["\u2581th", "e"],
        ["\u2581t", "he"],
        ["\u2581", "the"],
    ]
    assert ["\u2581", "\u2581"] in spec["model"]["merges"]  # from the "  " token, respelled

    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tmp_path / "ours" / "tokenizer.json"))
    assert t.encode("the the<start_of_turn>  he").tokens == [
        "<bos>",
        "the",
        "\u2581the",
        "<start_of_turn>",
        "\u2581\u2581",
        "he",
    ]
    assert t.encode("thing").tokens == ["<bos>", "th", "<0x69>", "<0x6E>", "g"]  # no "i", "n": bytes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.text(alphabet="ab \u2581", min_size=1, max_size=5), min_size=1, max_size=40))
def test_random_gemma_vocabularies_match_transformers(pieces, tmp_path, monkeypatch):
    ours, theirs = _both(_meta(["a", "b", "\u2581"] + pieces), tmp_path, monkeypatch)
    assert ours == theirs


@pytest.mark.parametrize("types", ["unk typed normal", "no types"])
def test_named_special_tokens_kept_whole_whatever_their_type(types, tmp_path, monkeypatch):
    """Transformers' Gemma tokenizer adds the unknown/BOS/EOS/padding tokens and <mask> as special tokens
    whatever the file's types say; ours does too (a file typing <unk> as normal, or listing no types)."""
    meta = _meta(["\u2581a", "b"])
    if types == "no types":
        del meta["tokenizer.ggml.token_type"]
    else:
        meta["tokenizer.ggml.token_type"][3] = 2
    ours, theirs = _both(meta, tmp_path, monkeypatch)
    assert ours == theirs
    added = {t["content"] for t in json.loads(ours)["added_tokens"] if t["special"]}
    assert {"<pad>", "<eos>", "<bos>", "<unk>", "<mask>"} <= added


def test_gguf_without_a_token_list_is_one_error(tmp_path):
    meta = _meta([])
    del meta["tokenizer.ggml.tokens"]
    with pytest.raises(MobilizeError, match="no tokenizer.ggml.tokens"):
        tok_module._from_gguf("bad.gguf", meta, tmp_path)
