"""LoRA adapters for a package with slots (`export --lora-slots`): a PEFT adapter converted for one package, and
read back before a run.

The file is ONNX Runtime's adapter format (`.onnx_adapter`, written and read with `onnxruntime.AdapterFormat`),
which `onnxruntime.LoraAdapter` and `onnxruntime_genai.Adapters` load. Each slot's A is stored as [in, rank] and
its B as [rank, out] with the adapter's scale folded in, both padded with zeros to the package's slot rank (an
exact no-op). The file's model version is the first 28 bits of a digest of the package's model files (their
sha256 in the manifest; not the manifest's own, which `mobilize eval` rewrites): an adapter made for one package
is refused on any other before it is bound.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.frontend.config import config_from_record, expected_shapes
from mobilize.frontend.lora import Slots, read_adapter, slot_inputs
from mobilize.manifest import Manifest
from mobilize.safe_io import quoted

SUFFIX = ".onnx_adapter"
FORMAT_VERSION = 1


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
    return int(hashlib.sha256(repr(models).encode()).hexdigest()[:7], 16)


def convert(adapter_dir: str | Path, package: str | Path, out: str | Path | None = None, overwrite: bool = False):
    """The PEFT adapter as a `.onnx_adapter` for `package`; every pair checked against the package's slots."""
    import onnxruntime as ort

    package = Path(package)
    manifest = Manifest.read(package)
    slots, modules = package_slots(package, manifest)
    cfg = config_from_record(manifest.architecture.record)
    adapter = read_adapter(adapter_dir, cfg, expected_shapes(cfg))
    where = f"adapter {quoted(adapter_dir)}"
    parameters = {}
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
        a_name, b_name = slot_inputs(pair.module)
        parameters[a_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
        parameters[b_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b))
    for module, (k, n) in modules.items():  # slots the adapter leaves alone: zeros of the slot's rank (every slot
        a_name, b_name = slot_inputs(module)  # shares the graph's one `lora_rank` dimension)
        if a_name not in parameters:
            parameters[a_name] = ort.OrtValue.ortvalue_from_numpy(np.zeros((k, slots.rank), np.float32))
            parameters[b_name] = ort.OrtValue.ortvalue_from_numpy(np.zeros((slots.rank, n), np.float32))
    out = Path(out) if out is not None else package.parent / f"{Path(adapter_dir).resolve().name}{SUFFIX}"
    if os.path.lexists(out) and not overwrite:
        raise MobilizeError(f"{quoted(out)} exists (pass --overwrite to replace it)")
    if out.is_dir() or out.is_symlink():
        raise MobilizeError(f"{quoted(out)} is a directory or a symlink: not replaced")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(FORMAT_VERSION)
    fmt.set_model_version(base_version(manifest))
    fmt.set_parameters(parameters)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        fmt.export_adapter(str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out, adapter, len(modules)


def check_adapter(path: str | Path, package: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """An adapter file's parameters, checked against the package before anything is bound: made for this
    package, every tensor a slot's, of the slot's shape."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise MobilizeError(f"--adapter {quoted(path)} is not a file")
    _, modules = package_slots(package, manifest)
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception:  # ORT's own types: not the format, truncated
        raise MobilizeError(f"--adapter {quoted(path)} is not an ONNX Runtime adapter file ({SUFFIX})") from None
    if fmt.get_model_version() != base_version(manifest):
        raise MobilizeError(f"--adapter {quoted(path)} was made for another package than {quoted(package)} (its base "
                            f"{fmt.get_model_version():07x}, this one's {base_version(manifest):07x}); "
                            "convert the PEFT adapter again with mobilize adapter")  # fmt: skip
    slots = manifest.lora_slots.rank
    expected = {}
    for module, (k, n) in modules.items():
        a, b = slot_inputs(module)
        expected[a], expected[b] = (k, slots), (slots, n)
    # copies: the arrays are views of memory the reader owns, freed with it
    params = {name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()}
    for name, value in params.items():
        if name not in expected:
            raise MobilizeError(f"--adapter {quoted(path)}: tensor {quoted(name)} is no slot of this package")
        if tuple(value.shape) != expected[name] or value.dtype != np.float32:
            raise MobilizeError(f"--adapter {quoted(path)}: tensor {quoted(name)} is {value.dtype} "
                                f"{list(value.shape)}; the slot takes float32 {list(expected[name])}")  # fmt: skip
    if not params:
        raise MobilizeError(f"--adapter {quoted(path)} holds no tensors")
    half = next((n for n in params if _other_half(n) not in params), None)
    if half is not None:
        raise MobilizeError(f"--adapter {quoted(path)}: {quoted(half)} comes without {quoted(_other_half(half))}")
    return params


def _other_half(name: str) -> str:
    return name[:-1] + ("B" if name.endswith("A") else "A")


def merged_reference_deltas(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """weight name -> the [out, in] update an adapter file makes (for a reference with the adapter merged)."""
    deltas = {}
    for name, a in params.items():
        if name.endswith(".lora_A"):
            module = name.removesuffix(".lora_A")
            deltas[module + ".weight"] = (a @ params[module + ".lora_B"]).T
    return deltas

