from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import write_tiny_gguf, write_tiny_hf  # noqa: E402

from mobilize.frontend.families.registry import FAMILIES  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """family -> a tiny random Hugging Face checkpoint directory written by transformers."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = write_tiny_hf(FAMILIES[family].tiny(), tmp_path_factory.mktemp(f"{family}_hf"))
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"{family}_gguf") / f"{family}-tiny-f32.gguf"
            made[family] = write_tiny_gguf(FAMILIES[family].tiny(), tiny_hf(family), out)
        return made[family]

    return get
