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


# The files that take minutes, collected first. With `--dist loadfile` a worker takes whole files in collection
# order, so a long file collected last runs alone while the other core idles; longest first keeps both busy.
HEAVY_FIRST = ("test_arm64_device.py", "test_gemma3_real.py", "test_hostile_corpus.py", "test_streaming.py",
               "test_integrity.py", "test_lora_real.py", "test_bench_suite.py", "test_lora_slots.py",
               "test_llama_cpp_gguf.py", "test_lora.py", "test_lora_gguf.py", "test_eval.py",
               "test_fit.py")  # fmt: skip  (by their --durations, 2026-12-05)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
