"""A corpus of malformed checkpoints, each made from a valid tiny one by one targeted edit: every one is
refused with one error line and exit code 1 (with test_bad_input.py: more than 30 cases)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest


def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _refused(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mobilize: error: "), r.stderr
    assert needle in lines[0], lines[0]


def _u32(data: bytearray, at: int, value: int) -> None:
    data[at : at + 4] = struct.pack("<I", value)


def _u64(data: bytearray, at: int, value: int) -> None:
    data[at : at + 8] = struct.pack("<Q", value)


FIRST_KEY = 24  # GGUF: magic, u32 version, u64 tensor count, u64 key count, then the first key's u64 length


def _key_type_at(data: bytearray) -> int:
    (n,) = struct.unpack("<Q", data[FIRST_KEY : FIRST_KEY + 8])
    return FIRST_KEY + 8 + n


GGUF_EDITS = {
    "wrong magic": (lambda d: d.__setitem__(slice(0, 4), b"GGUX"), "not a GGUF file"),
    "version 99": (lambda d: _u32(d, 4, 99), "GGUF version 99"),
    "version 1": (lambda d: _u32(d, 4, 1), "GGUF version 1"),
    "2**60 tensors": (lambda d: _u64(d, 8, 1 << 60), "more than fit"),
    "2**60 keys": (lambda d: _u64(d, 16, 1 << 60), "more than fit"),
    "key length 2**40": (lambda d: _u64(d, FIRST_KEY, 1 << 40), "absurd"),
    "key not UTF-8": (lambda d: d.__setitem__(slice(FIRST_KEY + 8, FIRST_KEY + 10), b"\xff\xfe"), "not UTF-8"),
    "value type 99": (lambda d: _u32(d, _key_type_at(d), 99), "unknown GGUF value type 99"),
    "cut after the header": (lambda d: d.__delitem__(slice(40, None)), "gguf"),
    "cut in the tensor data": (lambda d: d.__delitem__(slice(len(d) - 64, None)), "gguf"),
    "empty": (lambda d: d.__delitem__(slice(0, None)), "gguf"),
}


@pytest.mark.parametrize("case", sorted(GGUF_EDITS))
def test_malformed_gguf(case, tiny_gguf, tmp_path):
    edit, needle = GGUF_EDITS[case]
    data = bytearray(tiny_gguf("llama").read_bytes())
    edit(data)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    _refused(_inspect(bad), needle)


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path: Path, header_bytes: bytes, body: bytes, length: int | None = None) -> None:
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + body)


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _set(field: str, value):
    def edit(h: dict) -> bytes:
        h[_first(h)][field] = value
        return json.dumps(h).encode()

    return edit


SAFETENSORS_EDITS = {
    "unknown dtype": (_set("dtype", "F7"), "F7"),
    "negative dim": (_set("shape", [-4, 16]), "model.safetensors"),
    "float dim": (_set("shape", [4.5, 16]), "model.safetensors"),
    "offsets reversed": (
        lambda h: (h[_first(h)].update(data_offsets=h[_first(h)]["data_offsets"][::-1]), json.dumps(h).encode())[1],
        "model.safetensors",
    ),  # fmt: skip
    "size disagrees with shape": (_set("shape", [3, 3]), "model.safetensors"),
    "dims overflow int64": (_set("shape", [1 << 40, 1 << 40]), "model.safetensors"),
    "header is a list": (lambda h: b"[1, 2, 3]", "model.safetensors"),
    "header not UTF-8": (lambda h: b'{"\xff": 1}', "model.safetensors"),
    "header nested 100000 deep": (lambda h: b"[" * 100000 + b"]" * 100000, "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_EDITS))
def test_malformed_safetensors(case, tiny_hf, tmp_path):
    edit, needle = SAFETENSORS_EDITS[case]
    d = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), d)
    header, body = _header(d / "model.safetensors")
    _write(d / "model.safetensors", edit(header), body)
    _refused(_inspect(d), needle)


def test_safetensors_header_length_2_63(tiny_hf, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), d)
    header, body = _header(d / "model.safetensors")
    _write(d / "model.safetensors", json.dumps(header).encode(), body, length=1 << 63)
    _refused(_inspect(d), "model.safetensors")


CONFIG_EDITS = {
    "a list": "[1, 2]",
    "nested 100000 deep": "[" * 100000 + "]" * 100000,
    "negative vocab": None,
    "not UTF-8": b"\xff\xfe{}",
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_malformed_config(case, tiny_hf, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), d)
    text = CONFIG_EDITS[case]
    if text is None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["vocab_size"] = -5
        text = json.dumps(cfg)
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    _refused(_inspect(d), "config")


TOKENIZER_EDITS = {
    "tokenizer.json not JSON": ("tokenizer.json", b'{"version": ', "tokenizer.json is not valid JSON"),
    "tokenizer.json a list": ("tokenizer.json", b"[1, 2, 3]", "tokenizer.json is not a JSON object"),
    "tokenizer.json nested 100000 deep": ("tokenizer.json", b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    "tokenizer.json not a tokenizer": ("tokenizer.json", b'{"model": {"type": "Nope"}}', "tokenizers library"),
    "tokenizer.json not UTF-8": ("tokenizer.json", b"\xff\xfe{}", "tokenizer.json is not valid JSON"),
    "tokenizer_config.json a string": ("tokenizer_config.json", b'"hello"', "tokenizer_config.json is not a JSON"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_EDITS))
def test_malformed_tokenizer_files(case, tiny_hf, tmp_path):
    """Tokenizer files are parsed before they are copied into a package: one line, no package."""
    d = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), d)
    name, data, needle = TOKENIZER_EDITS[case]
    (d / name).write_bytes(data)
    out = tmp_path / "pkg"
    r = subprocess.run(
        [sys.executable, "-m", "mobilize.cli", "export", str(d), "--out", str(out), "-q", "fp32"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _refused(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
