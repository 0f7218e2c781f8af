"""The family registry: one dict literal wiring each family's config parsing, quirks and tiny config."""

from __future__ import annotations

from types import ModuleType

from mobilize.errors import UnsupportedArchitectureError
from mobilize.frontend.families import gemma3, llama, mistral, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma3": gemma3,
}

# llama.cpp's `general.architecture` -> our family
GGUF_ARCHES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


def family_for_hf(model_type: str | None) -> str:
    for name, mod in FAMILIES.items():
        if model_type in mod.HF_MODEL_TYPES:
            return name
    known = ", ".join(t for m in FAMILIES.values() for t in m.HF_MODEL_TYPES)
    raise UnsupportedArchitectureError(f"model_type {model_type!r} is not supported (supported: {known})")


def family_for_gguf(arch: str | None) -> str:
    if arch not in GGUF_ARCHES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHES)})"
        )
    return GGUF_ARCHES[arch]
