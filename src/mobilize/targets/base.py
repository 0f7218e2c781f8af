"""What a target is to the driver: one object per format behind `targets/registry.py`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mobilize.frontend.loader import LoadedModel
from mobilize.frontend.lora import Slots
from mobilize.manifest import Architecture, Io, KvCache, Manifest, TargetRecord
from mobilize.quant.plan import TargetCaps
from mobilize.quant.recipes import Recipe

Statistics = Callable[[], Mapping[str, np.ndarray]] | None  # calibration, when the first weight needs it


@dataclasses.dataclass(frozen=True)
class Lowering:
    """What `lower` needs beyond the model and the recipe (from the export options and the preset)."""

    max_seq_len: int
    opset: str = "ort"
    logits: str = "last"
    prefill_lens: tuple[int, ...] = (32, 128)
    bundle: str | None = None  # tflite: "litertlm" also writes model.litertlm
    kv_dtype: str = "float32"  # of the KV cache: "float32" or "float16"
    lora_slots: Slots | None = None  # LoRA slots whose weights are given at run time


@dataclasses.dataclass
class Written:
    """What the manifest says of the model files a target wrote."""

    io: Io
    kv_cache: KvCache
    reports: list[dict[str, Any]]
    lowering: dict[str, Any]  # the format's own fields of the manifest's `target`


class Target(Protocol):
    name: str
    caps: TargetCaps  # what its kernels store (the weight planner's view)
    kv_dtypes: tuple[str, ...]  # the KV cache dtypes a preset's plan may choose, in order of preference
    # The target quantizes the weights that use calibration last, while it writes the others: calibration
    # then runs beside the write (a child process) instead of before the lowering.
    lazy_statistics: bool

    def check(self, how: Lowering) -> None:
        """Refuse, in one line, options this target does not take."""

    def lower(self, model: LoadedModel, recipe: Recipe, how: Lowering, statistics: Statistics, phase) -> Any:
        """The model for this target (weights still lazy)."""

    def write(self, lowered: Any, model: LoadedModel, how: Lowering, out: Path, phase) -> Written:
        """The model files into `out`, weights streamed."""

    def finish(self, model: LoadedModel, manifest: Manifest, how: Lowering, out: Path, phase) -> None:
        """Files that need the tokenizer or the manifest's fields (written after both)."""

    def check_tokenizer(self, package: Path) -> dict[str, Any]:
        """The package's tokenizer against the runtime's own (one error line on a mismatch); what was checked."""

    def weight_bytes(self, package_dir: Path) -> tuple[int, int]:
        """(bytes of every weight, bytes one decode step reads: an embedding table one row), for `fit`."""

    def activation_bytes(self, arch: Architecture, target: TargetRecord, kv_dtype: str, prompt_len: int) -> int:
        """The largest activations a run allocates, for `fit` (and the presets' plans, before any file exists)."""

    def kv_cache_bytes(self, config, max_seq_len: int, kv_dtype: str) -> int:
        """The KV cache a package of this config holds (its buffers' bytes), before it is written."""

    def kv_read_bytes(self, kv_bytes: int, kv_dtype: str) -> int:
        """What a decode step at full context reads of a cache of `kv_bytes` (the copies it makes included)."""

    # `mobilize fit`'s words for what activation_bytes counts ({prompt_len}: the prompt's length)
    activations_are: str

    def readme(self, manifest: Manifest, file_names: list[str]) -> str:
        """The package's README.md for the app developer."""


def exported_from(manifest: Manifest) -> str:
    """The README's provenance line: the source, and any LoRA adapters merged into it."""
    source = manifest.source
    line = f"Exported by mobilize {manifest.mobilize_version} from `{source.id}` ({source.format})"
    adapters = source.adapters
    if adapters:
        merged = ", ".join(f"`{a['path']}` (rank {a['rank']}, {', '.join(a['targets'])})" for a in adapters)
        line += f", with the LoRA adapter{'s' if len(adapters) > 1 else ''} {merged} merged into its weights"
    return line + "."
