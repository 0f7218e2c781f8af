"""`mobilize verify`: a package is what its manifest says, byte for byte, before anything loads it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError
from mobilize.safe_io import quoted, read_bytes, read_json, sha256_file

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"  # the manifest signed (OpenSSH's signature format): package/signing.py
MAX_MANIFEST_BYTES = 16 << 20
# Every name export writes (the tokenizer's as the source has them); nothing else may be in a package.
PACKAGE_FILES = frozenset({
    "model.onnx", "model.onnx.data", "genai_config.json", "model.tflite", "model.litertlm", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json",
    "chat_template.jinja",
})  # fmt: skip
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


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_file = path / MANIFEST
    if not os.path.lexists(manifest_file):
        raise MobilizeError(f"{quoted(path)} is not a mobilize package (no {MANIFEST})")
    manifest = read_json(manifest_file, MAX_MANIFEST_BYTES)
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise MobilizeError(
                f"{quoted(manifest_file)}: {key!r} is missing or not a {getattr(kind, '__name__', kind)}"
            )
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise MobilizeError(
            f"{quoted(path)}: manifest schema {str(manifest['schema_version'])[:20]} "
            f"(this mobilize reads {SCHEMA_VERSION})"
        )
    return manifest


def manifest_digest(path: Path) -> str:
    return sha256_file(path / MANIFEST)


def verify_package(path: str | Path, check_io: bool = True, key: Path | None = None) -> dict[str, Any]:
    """Check everything a runtime will read before anything loads it: the signature of the manifest (with `key`,
    an OpenSSH public key), the manifest's schema, that the package holds only the files export writes, as
    regular files (no symlinks), each of the size and sha256 the manifest lists, and (`check_io`; a device
    checks the bytes only, with none of the model parsers) that the model's inputs and outputs are the
    manifest's, its external data or buffers inside the package, and `genai_config.json` as export writes it.
    Returns the manifest; raises MobilizeError."""
    path = Path(path)
    if not path.is_dir():
        raise MobilizeError(f"{quoted(path)} is not a package directory")
    if key is not None:
        check_signature(path, key)
    manifest = read_manifest(path)
    files = manifest["files"]
    for name, entry in sorted(files.items()):
        if name not in PACKAGE_FILES or not isinstance(entry, dict):
            raise MobilizeError(f"{quoted(path / MANIFEST)}: {quoted(name)} is not a file a package has")
    for entry in os.scandir(path):
        if entry.name in (MANIFEST, SIGNATURE):
            pass
        elif entry.name not in files:
            raise MobilizeError(f"{quoted(path)}: {quoted(entry.name)} is not in the manifest")
        if not entry.is_file(follow_symlinks=False):  # a symlink would hand a runtime a file from outside
            raise MobilizeError(f"{quoted(path)}: {quoted(entry.name)} is not a regular file")
    for name, entry in sorted(files.items()):
        file = path / name
        if not os.path.lexists(file):
            raise MobilizeError(f"{quoted(path)}: {name} is missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise MobilizeError(
                f"{quoted(path)}: {name} has {size} bytes, the manifest says {str(entry.get('bytes'))[:30]}"
            )
        if sha256_file(file) != entry.get("sha256"):
            raise MobilizeError(
                f"{quoted(path)}: {name} does not match its sha256 in the manifest (modified or corrupt)"
            )
    if not check_io:
        return manifest
    if manifest["format"] == "onnx":
        _check_io(path, manifest["io"], files)
    elif manifest["format"] == "tflite":
        _check_tflite_io(path, manifest["io"])
    else:
        raise MobilizeError(f"{quoted(path)}: unknown package format {quoted(manifest['format'])} (onnx, tflite)")
    try:
        wrong = _check_describes_io(manifest)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration):
        wrong = ["its structure"]
    if wrong:
        raise MobilizeError(f"{quoted(path)}: the manifest's {', '.join(wrong)} disagree with the model's I/O")
    if manifest["format"] == "onnx":
        _check_genai_config(path, manifest)
    return manifest


def _check_describes_io(manifest: dict) -> list[str]:
    """The manifest's architecture and cache say what the model's own inputs and outputs say (the I/O was
    checked against the model file): an edited vocabulary size, head count or cache length is refused."""
    arch, io, kv = manifest["architecture"], manifest["io"], manifest["kv_cache"]
    logits = next(o for o in io["outputs"] if o["name"] == "logits")
    caches = [i for i in io["inputs"] if i["name"].startswith(("past_key_values.", "kv_cache_"))]
    facts = {
        "vocab_size": logits["shape"][-1] == arch["vocab_size"],
        "num_layers": len(caches) == 2 * arch["num_layers"],
        "num_kv_heads": all(c["shape"][1] == arch["num_kv_heads"] for c in caches),
        "head_dim": all(c["shape"][3] == arch["head_dim"] for c in caches),
    }
    lengths = [c["shape"][2] for c in caches if isinstance(c["shape"][2], int)]
    if kv.get("layout") == "static":
        longest = max(lengths, default=None)
        facts["max_seq_len"] = longest == manifest["target"]["max_seq_len"] == kv["max_seq_len"]
        dtype = {"float32": "FLOAT", "float16": "FLOAT16"}[kv.get("dtype", "float32")]
        facts["kv_cache.dtype"] = all(c["dtype"] == dtype for c in caches)
    return [k for k, ok in facts.items() if not ok]


def check_signature(path: Path, key: Path) -> str:
    """The manifest signed by `key`'s private half (manifest.json.sig); returns the key's fingerprint."""
    from mobilize.package.signing import fingerprint, load_public_key, verify_signature

    public = load_public_key(key)
    sig = path / SIGNATURE
    if not os.path.lexists(sig):
        raise MobilizeError(f"{quoted(path)} is not signed (no {SIGNATURE}); --key asks for a signed package")
    verify_signature(
        read_bytes(sig, 64 << 10),
        read_bytes(path / MANIFEST, MAX_MANIFEST_BYTES),
        public,
        quoted(path / SIGNATURE),
    )
    return fingerprint(public)


def signer(path: Path) -> str | None:
    """The fingerprint of the key a package's signature names, unchecked (None: not signed)."""
    from mobilize.package.signing import fingerprint, signer_of

    sig = path / SIGNATURE
    if not os.path.lexists(sig):
        return None
    return fingerprint(signer_of(read_bytes(sig, 64 << 10), quoted(path / SIGNATURE)))


def _check_genai_config(path: Path, manifest: dict) -> None:
    """genai_config.json is what export writes for this manifest: ONNX Runtime GenAI reads it to decide what
    to load (a native library, other files, providers), so any other content is refused."""
    from mobilize.targets.onnx.genai_config import expected_genai_config

    if "genai_config.json" not in manifest["files"]:
        return
    found = read_json(path / "genai_config.json")
    try:
        expected = expected_genai_config(manifest, found)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MobilizeError(
            f"{quoted(path)}: the manifest cannot describe a genai_config.json ({type(e).__name__})"
        ) from None
    if found != expected:
        raise MobilizeError(f"{quoted(path)}: genai_config.json is not the one export writes for this manifest")


def _check_tflite_io(path: Path, io: dict) -> None:
    from mobilize.targets.tflite.writer import check_buffers, tflite_io

    try:
        check_buffers(path / "model.tflite")
        found = tflite_io(path / "model.tflite")
    except MobilizeError:
        raise
    except Exception as e:  # a flatbuffer that passed its hash but does not parse
        raise MobilizeError(f"{path}/model.tflite cannot be parsed ({type(e).__name__})") from None
    if found != io:
        raise MobilizeError(f"{path}: the model's signatures are not the manifest's")


def _check_io(path: Path, io: dict, files: dict) -> None:
    import onnx

    try:
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    except Exception as e:  # the protobuf parser's errors are many; the file passed its hash, so say so
        raise MobilizeError(f"{quoted(path)}/model.onnx cannot be parsed ({type(e).__name__})") from None
    _check_external_data(path, model, files)

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


def _check_external_data(path: Path, model, files: dict) -> None:
    """Every tensor stored outside model.onnx points into a file of the package, within its bytes (ONNX Runtime
    would follow a `../` or an absolute location to any file on the device)."""
    import onnx

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(g)

    for t in tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if location not in files or location in ("model.onnx", MANIFEST) or not location.endswith(".data"):
            raise MobilizeError(
                f"{quoted(path)}/model.onnx: tensor {quoted(t.name)} is stored in {quoted(location)}, not in a data "
                "file of the package"
            )
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"])
        except (KeyError, ValueError):
            raise MobilizeError(
                f"{quoted(path)}/model.onnx: tensor {quoted(t.name)} has no valid offset/length"
            ) from None
        if offset < 0 or length < 0 or offset + length > files[location]["bytes"]:
            raise MobilizeError(f"{quoted(path)}/model.onnx: tensor {quoted(t.name)} lies outside {location}")
