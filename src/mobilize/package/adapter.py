"""LoRA adapters for a package with slots (`export --lora-slots`): a PEFT adapter converted for one package, and
read back before a run.

The file is the package's format's (its target's `adapter_file()`): ONNX Runtime's `.onnx_adapter` for ONNX, the
LoRA flatbuffer LiteRT-LM loads (`.lora.tflite`) for TFLite. Either way each slot's A is stored as [in, rank] and
its B as [rank, out] with the adapter's scale folded in, both padded with zeros to the package's slot rank (an
exact no-op), under the names the package's slot inputs have; slots the adapter leaves alone hold zeros. The file
records the first 28 bits of a digest of the package's model files (their sha256 in the manifest; not the
manifest's own, which `mobilize eval` rewrites): an adapter made for one package is refused on any other before it
is bound.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.frontend.config import config_from_record, expected_shapes
from mobilize.frontend.lora import Slots, read_adapter
from mobilize.manifest import Manifest
from mobilize.safe_io import quoted, sha256_file
from mobilize.targets.registry import runtime


def package_slots(package: Path, manifest: Manifest) -> tuple[Slots, dict[str, tuple[int, int]]]:
    record = manifest.lora_slots
    if record is None:
        raise MobilizeError(f"{quoted(package)} has no LoRA slots (export it with --lora-slots RANK)")
    slots = Slots(record.rank, record.targets)
    return slots, slots.modules(config_from_record(manifest.architecture.record))


def base_version(manifest: Manifest) -> int:
    """The model version an adapter for this package carries: a digest of its model files' sha256, cut to fit an
    int32."""
    models = sorted((name, entry.sha256) for name, entry in manifest.files.items() if name.startswith("model."))
    if not models:
        raise MobilizeError("the package's manifest lists no model files")
    return _version(models)


def _version(models: list[tuple[str, str]]) -> int:
    return int(hashlib.sha256(repr(models).encode()).hexdigest()[:7], 16)


def write_empty_adapter(package: Path, manifest: Manifest, digest=sha256_file) -> str | None:
    """At export, for a format whose runtime needs an adapter to run a slots package at all (its `EMPTY` file name):
    the all-zero adapter, for the model files already written in `package` (`digest`: their sha256, the export's
    own, so that each is hashed once). Returns its name, or None."""
    file = runtime(manifest.format).adapter_file()
    if manifest.lora_slots is None or file.EMPTY is None:
        return None
    models = sorted((p.name, digest(p)) for p in package.iterdir() if p.name.startswith("model."))
    zeros = {name: np.zeros(shape, np.float32) for name, (_, _, shape) in slot_tensors(package, manifest).items()}
    file.write_adapter(package / file.EMPTY, zeros, _version(models), manifest.lora_slots.rank)
    return file.EMPTY


def slot_tensors(package: Path, manifest: Manifest) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """Every slot tensor of the package by the name its format gives it: (module, "A" or "B", its shape)."""
    slots, modules = package_slots(package, manifest)
    name = runtime(manifest.format).adapter_file().slot_name
    out = {}
    for module, (k, n) in modules.items():
        out[name(module, "A")] = (module, "A", (k, slots.rank))
        out[name(module, "B")] = (module, "B", (slots.rank, n))
    return out


def convert(adapter_dir: str | Path, package: str | Path, out: str | Path | None = None, overwrite: bool = False):
    """The PEFT adapter (or llama.cpp GGUF LoRA) as the package format's adapter file; every pair checked against the
    package's slots."""
    package = Path(package)
    manifest = Manifest.read(package)
    slots, modules = package_slots(package, manifest)
    file = runtime(manifest.format).adapter_file()
    cfg = config_from_record(manifest.architecture.record)
    adapter = read_adapter(adapter_dir, cfg, expected_shapes(cfg))
    where = f"adapter {quoted(adapter_dir)}"
    tensors = {}
    for pair in adapter.pairs:
        if pair.module not in modules:
            kinds = ", ".join(slots.targets)
            raise MobilizeError(f"{where}: module {quoted(pair.module)} has no slot in {quoted(package)} (its slots: "
                                f"{kinds}); export with --lora-targets covering it, or merge with --lora")  # fmt: skip
        if pair.rank > slots.rank:
            raise MobilizeError(f"{where}: rank {pair.rank} on {quoted(pair.module)} is more than the package's slot "
                                f"rank {slots.rank}; export with --lora-slots {pair.rank} or more")  # fmt: skip
        k, n = modules[pair.module]
        a = np.zeros((k, slots.rank), np.float32)
        b = np.zeros((slots.rank, n), np.float32)
        a[:, : pair.rank] = pair.a.load().T
        b[: pair.rank] = pair.b.load().T * np.float32(pair.scale)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise MobilizeError(f"{where}: the LoRA weights of {quoted(pair.module)} hold NaN or infinite values")
        tensors[file.slot_name(pair.module, "A")], tensors[file.slot_name(pair.module, "B")] = a, b
    for name, (_, _, shape) in slot_tensors(package, manifest).items():  # slots the adapter leaves alone: zeros of
        tensors.setdefault(name, np.zeros(shape, np.float32))  # the slot's rank (ONNX's slots share one dimension)
    named = Path(adapter_dir).resolve()
    named = named.stem if adapter.format == "gguf" else named.name  # (a GGUF LoRA is a file: its name without .gguf)
    out = Path(out) if out is not None else package.parent / f"{named}{file.SUFFIX}"
    if os.path.lexists(out) and not overwrite:
        raise MobilizeError(f"{quoted(out)} exists (pass --overwrite to replace it)")
    if out.is_dir() or out.is_symlink():
        raise MobilizeError(f"{quoted(out)} is a directory or a symlink: not replaced")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        file.write_adapter(tmp, tensors, base_version(manifest), slots.rank)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out, adapter, len(modules)


def adapter_name(path: str | Path, manifest: Manifest) -> str:
    """What runs call an adapter file: its name without the format's suffix."""
    return Path(path).name.removesuffix(runtime(manifest.format).adapter_file().SUFFIX)


def check_adapter(path: str | Path, package: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """An adapter file's tensors by slot input name, checked against the package before anything is bound: made
    for this package, every tensor a slot's, of the slot's shape."""
    path = Path(path)
    if not path.is_file():
        raise MobilizeError(f"--adapter {quoted(path)} is not a file")
    expected = slot_tensors(package, manifest)
    base, params = runtime(manifest.format).adapter_file().read_adapter(path)
    if base != base_version(manifest):
        raise MobilizeError(f"--adapter {quoted(path)} was made for another package than {quoted(package)} (its base "
                            f"{base:07x}, this one's {base_version(manifest):07x}); "
                            "convert the PEFT adapter again with mobilize adapter")  # fmt: skip
    for name, value in params.items():
        if name not in expected:
            raise MobilizeError(f"--adapter {quoted(path)}: tensor {quoted(name)} is no slot of this package")
        if tuple(value.shape) != expected[name][2] or value.dtype != np.float32:
            raise MobilizeError(f"--adapter {quoted(path)}: tensor {quoted(name)} is {value.dtype} "
                                f"{list(value.shape)}; the slot takes float32 {list(expected[name][2])}")  # fmt: skip
    if not params:
        raise MobilizeError(f"--adapter {quoted(path)} holds no tensors")
    slot_name = runtime(manifest.format).adapter_file().slot_name
    for name in params:
        module, half, _ = expected[name]
        other = slot_name(module, "B" if half == "A" else "A")
        if other not in params:
            raise MobilizeError(f"--adapter {quoted(path)}: {quoted(name)} comes without {quoted(other)}")
    # slots the file leaves out hold zeros (a runtime's inputs keep what they were last given otherwise)
    return {name: params.get(name, np.zeros(shape, np.float32)) for name, (_, _, shape) in expected.items()}


def merged_reference_deltas(params: dict[str, np.ndarray], package: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """weight name -> the [out, in] update an adapter file makes (for a reference with the adapter merged)."""
    expected = slot_tensors(package, manifest)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, value in params.items():
        module, half, _ = expected[name]
        halves.setdefault(module, {})[half] = value
    return {module + ".weight": (h["A"] @ h["B"]).T for module, h in halves.items()}
