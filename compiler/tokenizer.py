"""Tokenizer files for the package: copied from a Hugging Face directory, or converted from a GGUF's
embedded vocabulary (through transformers' own GGUF tokenizer converter) into `tokenizer.json`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mobilize.compiler.errors import MobilizeError
from mobilize.compiler.sources.base import Checkpoint

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


def write_tokenizer(ckpt: Checkpoint, out: Path) -> list[str]:
    """Write the tokenizer next to the model; return the file names (empty when the source has none)."""
    if ckpt.format == "hf":
        src = Path(ckpt.files[0]).parent
        written = []
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
                written.append(name)
        return written
    if ckpt.format == "gguf" and ckpt.gguf_metadata and "tokenizer.ggml.tokens" in ckpt.gguf_metadata:
        return _from_gguf(Path(ckpt.files[0]), out)
    return []


def _from_gguf(path: Path, out: Path) -> list[str]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MobilizeError("converting a GGUF tokenizer needs transformers: pip install transformers") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # the converter's errors are many and unrelated; name the file and the cause
        raise MobilizeError(f"{path.name}: its tokenizer could not be converted ({type(e).__name__}: {e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        written = []
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out / name)
                written.append(name)
    if "tokenizer.json" not in written:
        raise MobilizeError(f"{path.name}: its tokenizer converted to no tokenizer.json")
    return written
