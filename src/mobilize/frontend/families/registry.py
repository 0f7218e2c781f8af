"""The family registry: one dict literal, each family's record from its own file."""

from __future__ import annotations

from mobilize.errors import UnsupportedArchitectureError
from mobilize.frontend.families import gemma3, llama, mistral, phi3, qwen2, qwen3
from mobilize.frontend.families.common import Family

FAMILIES: dict[str, Family] = {
    "llama": llama.FAMILY,
    "mistral": mistral.FAMILY,
    "qwen2": qwen2.FAMILY,
    "qwen3": qwen3.FAMILY,
    "gemma3": gemma3.FAMILY,
    "phi3": phi3.FAMILY,
}


def family_for_hf(model_type: str | None) -> str:
    for name, family in FAMILIES.items():
        if model_type in family.hf_model_types:
            return name
    known = ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise UnsupportedArchitectureError(f"model_type {repr(model_type)[:60]} is not supported (supported: {known})")


def family_for_gguf(arch: str | None) -> str:
    for name, family in FAMILIES.items():
        if arch == family.gguf_arch:
            return name
    known = ", ".join(f.gguf_arch for f in FAMILIES.values())
    raise UnsupportedArchitectureError(f"GGUF architecture {repr(arch)[:60]} is not supported (supported: {known})")
