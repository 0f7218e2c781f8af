"""`mobilize verify`: a package is what its manifest says, byte for byte, before anything loads it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "mobilize_version": str,
    "source": dict,
    "architecture": dict,
    "format": str,
    "recipe": dict,
    "build_report": dict,
    "target": dict,
    "kv_cache": dict,
    "io": dict,
    "files": dict,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise MobilizeError(f"{path} is not a mobilize package (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MobilizeError(f"{path}/{MANIFEST} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(manifest, dict):
        raise MobilizeError(f"{path}/{MANIFEST} is not a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise MobilizeError(f"{path}/{MANIFEST}: '{key}' is missing or not a {getattr(kind, '__name__', kind)}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise MobilizeError(
            f"{path}: manifest schema {manifest['schema_version']} (this mobilize reads {SCHEMA_VERSION})"
        )
    return manifest


def verify_package(path: str | Path, check_io: bool = True) -> dict[str, Any]:
    """Check the manifest's schema, every file's size and sha256 (and that no file is unlisted), and that
    the model's inputs and outputs are the manifest's (`check_io`: a device checks the bytes only, with
    none of the model parsers). Returns the manifest; raises MobilizeError."""
    path = Path(path)
    if not path.is_dir():
        raise MobilizeError(f"{path} is not a package directory")
    manifest = read_manifest(path)
    files = manifest["files"]
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if present - set(files):
        raise MobilizeError(f"{path}: {sorted(present - set(files))[0]} is not in the manifest")
    for name, entry in sorted(files.items()):
        file = path / name
        if "/" in name or name.startswith(".") or not isinstance(entry, dict):
            raise MobilizeError(f"{path}/{MANIFEST}: bad file entry {name!r}")
        if not file.is_file():
            raise MobilizeError(f"{path}: {name} is missing")
        if file.stat().st_size != entry.get("bytes"):
            raise MobilizeError(
                f"{path}: {name} has {file.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
            )
        if sha256_file(file) != entry.get("sha256"):
            raise MobilizeError(f"{path}: {name} does not match its sha256 in the manifest (modified or corrupt)")
    if not check_io:
        return manifest
    if manifest["format"] == "onnx":
        _check_io(path, manifest["io"])
    elif manifest["format"] == "tflite":
        _check_tflite_io(path, manifest["io"])
    else:
        raise MobilizeError(f"{path}: unknown package format {manifest['format']!r} (onnx, tflite)")
    return manifest


def _check_tflite_io(path: Path, io: dict) -> None:
    from mobilize.targets.tflite.writer import tflite_io

    try:
        found = tflite_io(path / "model.tflite")
    except MobilizeError:
        raise
    except Exception as e:  # a flatbuffer that passed its hash but does not parse
        raise MobilizeError(f"{path}/model.tflite cannot be parsed ({type(e).__name__})") from None
    if found != io:
        raise MobilizeError(f"{path}: the model's signatures are not the manifest's")


def _check_io(path: Path, io: dict) -> None:
    import onnx

    try:
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    except Exception as e:  # the protobuf parser's errors are many; the file passed its hash, so say so
        raise MobilizeError(f"{path}/model.onnx cannot be parsed ({type(e).__name__})") from None

    def describe(values) -> list[tuple]:
        out = []
        for v in values:
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            out.append((v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type), dims))
        return out

    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        expected = [(v["name"], v["dtype"], v["shape"]) for v in io.get(kind, [])]
        if describe(values) != expected:
            raise MobilizeError(f"{path}: the model's {kind} are not the manifest's")
