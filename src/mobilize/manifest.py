"""The package manifest (`manifest.json`): one typed record of what a package is.

Export builds it; everything after export reads it through this module and nothing else: verify, fit, the
package README, the runners, eval, bench, adapters, and a device's copy of the harness (so it imports only the
standard library and the project's base modules). `Manifest.parse` checks every field's type once, at the edge:
a hand-edited or hostile manifest is one error line naming the field, never a KeyError deep in a reader.

The JSON layout is schema 1, unchanged by the typed form (`to_json(parse(x)) == x` for what export writes); the
reports inside it (the build report, the fit, the evaluation, the preset's plan) are data for people and tools,
kept as JSON objects.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError
from mobilize.safe_io import quoted, read_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"  # the manifest signed (OpenSSH's signature format): package/signing.py
MAX_MANIFEST_BYTES = 16 << 20
KV_DTYPES = ("float32", "float16")

Json = Mapping[str, Any]


class _Fields:
    """Typed reads from one JSON object, each failure one line naming the field's path."""

    def __init__(self, data: object, where: str, path: str = "") -> None:
        self.where, self.path = where, path
        if not isinstance(data, dict):
            raise self._error("", "an object")
        self.data = data

    def _error(self, key: str, kind: str) -> MobilizeError:
        name = f"{self.path}.{key}" if self.path and key else self.path or key or "the manifest"
        return MobilizeError(f"{self.where}: {name!r} is missing or not {kind}")

    def get(self, key: str, kind: type | tuple[type, ...], what: str, optional: bool = False) -> Any:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, (int, float)):
            raise self._error(key, what)
        return value

    def integer(self, key: str, optional: bool = False) -> int | None:
        return self.get(key, int, "an integer", optional)

    def string(self, key: str, optional: bool = False) -> str | None:
        return self.get(key, str, "a string", optional)

    def obj(self, key: str, optional: bool = False) -> dict | None:
        return self.get(key, dict, "an object", optional)

    def sub(self, key: str, optional: bool = False) -> _Fields | None:
        value = self.obj(key, optional)
        return None if value is None else _Fields(value, self.where, f"{self.path}.{key}" if self.path else key)

    def strs(self, key: str, optional: bool = False) -> tuple[str, ...] | None:
        value = self.get(key, list, "a list of strings", optional)
        if value is not None and not all(isinstance(v, str) for v in value):
            raise self._error(key, "a list of strings")
        return None if value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A model input or output: its name, element type (ONNX's and LiteRT's names: FLOAT, FLOAT16, INT64, INT32)
    and shape (an int per fixed dimension, a name per symbolic one)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def parse(cls, data: object, where: str, path: str) -> TensorInfo:
        f = _Fields(data, where, path)
        shape = f.get("shape", list, "a list of dimensions")
        if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise f._error("shape", "a list of dimensions")
        return cls(f.string("name"), f.string("dtype"), tuple(shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class Io:
    """The model's inputs and outputs; a TFLite package's per signature too (its top level: `decode`'s)."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    signatures: Mapping[str, Io] | None = None

    @classmethod
    def parse(cls, data: object, where: str, path: str = "io") -> Io:
        f = _Fields(data, where, path)

        def values(kind: str) -> tuple[TensorInfo, ...]:
            items = f.get(kind, list, "a list of tensors")
            return tuple(TensorInfo.parse(v, where, f"{path}.{kind}[{i}]") for i, v in enumerate(items))

        sigs = f.obj("signatures", optional=True)
        signatures = None
        if sigs is not None:
            signatures = {k: cls.parse(v, where, f"{path}.signatures.{k}") for k, v in sigs.items()}
        return cls(values("inputs"), values("outputs"), signatures)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inputs": [v.to_json() for v in self.inputs],
            "outputs": [v.to_json() for v in self.outputs],
        }
        if self.signatures is not None:
            out["signatures"] = {k: v.to_json() for k, v in self.signatures.items()}
        return out

    def output(self, name: str) -> TensorInfo | None:
        return next((v for v in self.outputs if v.name == name), None)


@dataclasses.dataclass(frozen=True)
class Source:
    id: str  # the alias, path or file export was given
    format: str  # "hf", "gguf", "random"
    adapters: tuple[Json, ...] = ()  # LoRA adapters merged at export (frontend/lora.py's records)

    @classmethod
    def parse(cls, f: _Fields) -> Source:
        adapters = f.get("adapters", list, "a list of adapter records", optional=True) or []
        if not all(isinstance(a, dict) for a in adapters):
            raise f._error("adapters", "a list of adapter records")
        return cls(f.string("id"), f.string("format"), tuple(adapters))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "format": self.format, **({"adapters": list(self.adapters)} if self.adapters else {})}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The source's decoder config as export recorded it (frontend/config.py's `DecoderConfig`, field by field),
    with the sizes the package side reads checked and typed."""

    record: Json
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def parse(cls, f: _Fields) -> Architecture:
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        return cls(f.data, f.string("family"), *(f.integer(k) for k in sizes))

    @classmethod
    def of(cls, record: Json) -> Architecture:
        return cls.parse(_Fields(dict(record), "the model's config", "architecture"))


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str


@dataclasses.dataclass(frozen=True)
class TargetRecord:
    """The preset the package was made for and the runtime settings it ships with."""

    preset: str  # android, ios, host
    max_seq_len: int  # the KV cache's positions
    threads: int | None  # intra-op threads the runtime is asked for (the device's big cores; None: not said)
    lowering: Json = dataclasses.field(default_factory=dict)  # the format's own fields (onnx: opset, logits; ...)
    kv_dtype: str | None = None  # what the preset's plan chose (None: no device to plan for)
    plan: Json | None = None  # the plan: what it chose for its device and what it passed over

    @classmethod
    def parse(cls, f: _Fields) -> TargetRecord:
        own = ("name", "max_seq_len", "threads", "kv_dtype", "plan")
        lowering = {k: v for k, v in f.data.items() if k not in own}
        preset, length, threads = f.string("name"), f.integer("max_seq_len"), f.integer("threads", True)
        return cls(preset, length, threads, lowering, f.string("kv_dtype", True), f.obj("plan", True))

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.preset, "max_seq_len": self.max_seq_len, **self.lowering}
        if self.threads is not None:  # (packages of the first schema-1 exports do not say)
            out["threads"] = self.threads
        if self.kv_dtype is not None:
            out["kv_dtype"] = self.kv_dtype
        if self.plan is not None:
            out["plan"] = dict(self.plan)
        return out


@dataclasses.dataclass(frozen=True)
class KvCache:
    """The KV cache's layout: "static" (fixed buffers of `max_seq_len`, written in place) or "dynamic" (grows by
    concatenation); `details` is the target's description of it (tensor names, update op, sliding windows)."""

    layout: str
    max_seq_len: int | None = None
    dtype: str = "float32"
    details: Json = dataclasses.field(default_factory=dict)
    dtype_said: bool = True  # (packages of the first schema-1 exports have float32 caches and do not say so)

    @classmethod
    def parse(cls, f: _Fields) -> KvCache:
        layout = f.string("layout")
        if layout not in ("static", "dynamic"):
            raise f._error("layout", "'static' or 'dynamic'")
        if layout == "dynamic":
            return cls(layout)
        said = f.string("dtype", optional=True)
        dtype = said or "float32"
        if dtype not in KV_DTYPES:
            raise f._error("dtype", " or ".join(map(repr, KV_DTYPES)))
        details = {k: v for k, v in f.data.items() if k not in ("layout", "max_seq_len", "dtype")}
        return cls(layout, f.integer("max_seq_len"), dtype, details, said is not None)

    @classmethod
    def static(cls, max_seq_len: int, dtype: str, **details: Any) -> KvCache:
        return cls("static", max_seq_len, dtype, details)

    def to_json(self) -> dict[str, Any]:
        if self.layout == "dynamic":
            return {"layout": "dynamic"}
        said = {"dtype": self.dtype} if self.dtype_said else {}
        return {"layout": self.layout, "max_seq_len": self.max_seq_len, **said, **self.details}


@dataclasses.dataclass(frozen=True)
class LoraSlots:
    rank: int
    targets: tuple[str, ...]  # q_proj, v_proj, ...
    modules: int  # projections with a slot

    @classmethod
    def parse(cls, f: _Fields) -> LoraSlots:
        return cls(f.integer("rank"), f.strs("targets"), f.integer("modules"))

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "targets": list(self.targets), "modules": self.modules}


@dataclasses.dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    mobilize_version: str
    source: Source
    architecture: Architecture
    format: str  # the target that wrote it: targets/registry.py
    recipe: Recipe
    build_report: Json  # calibration and each pass's (or lowering's) report, per-tensor quantization plans
    target: TargetRecord
    kv_cache: KvCache
    io: Io
    tokenizer: tuple[str, ...] | None  # the tokenizer files (None: the source had none)
    files: Mapping[str, FileEntry] = dataclasses.field(default_factory=dict)  # every file but the manifest
    lora_slots: LoraSlots | None = None
    tokenizer_parity: Json | None = None  # the package's tokenizer against the runtime's own
    fit: Json | None = None  # package/fit.py against the preset's device
    evaluation: Json | None = None  # the last `mobilize eval`
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def parse(cls, data: object, where: str = "manifest") -> Manifest:
        f = _Fields(data, where)
        version = f.integer("schema_version")
        if version != SCHEMA_VERSION:
            raise MobilizeError(f"{where}: manifest schema {str(version)[:20]} (this mobilize reads {SCHEMA_VERSION})")
        recipe = f.sub("recipe")
        files = {}
        for name, entry in f.obj("files").items():
            e = _Fields(entry, where, f"files.{name}")
            files[name] = FileEntry(e.integer("bytes"), e.string("sha256"))
        slots = f.sub("lora_slots", optional=True)
        return cls(
            mobilize_version=f.string("mobilize_version"),
            source=Source.parse(f.sub("source")),
            architecture=Architecture.parse(f.sub("architecture")),
            format=f.string("format"),
            recipe=Recipe(recipe.string("name"), recipe.string("description")),
            build_report=f.obj("build_report"),
            target=TargetRecord.parse(f.sub("target")),
            kv_cache=KvCache.parse(f.sub("kv_cache")),
            io=Io.parse(f.obj("io"), where),
            tokenizer=f.strs("tokenizer", optional=True),
            files=files,
            lora_slots=None if slots is None else LoraSlots.parse(slots),
            tokenizer_parity=f.obj("tokenizer_parity", True),
            fit=f.obj("fit", True),
            evaluation=f.obj("evaluation", True),
            schema_version=version,
        )

    @classmethod
    def read(cls, package: Path) -> Manifest:
        """The manifest of a package directory (bounded, a regular file, every field checked)."""
        import os

        file = Path(package) / MANIFEST
        if not os.path.lexists(file):
            raise MobilizeError(f"{quoted(package)} is not a mobilize package (no {MANIFEST})")
        return cls.parse(read_json(file, MAX_MANIFEST_BYTES), quoted(file))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "mobilize_version": self.mobilize_version,
            "source": self.source.to_json(),
            "architecture": dict(self.architecture.record),
            "format": self.format,
            "recipe": {"name": self.recipe.name, "description": self.recipe.description},
            "build_report": dict(self.build_report),
            "target": self.target.to_json(),
            "kv_cache": self.kv_cache.to_json(),
            "io": self.io.to_json(),
            "tokenizer": None if self.tokenizer is None else list(self.tokenizer),
            "files": {k: {"bytes": v.bytes, "sha256": v.sha256} for k, v in self.files.items()},
        }
        optional = {"lora_slots": self.lora_slots and self.lora_slots.to_json(), "fit": self.fit,
                    "tokenizer_parity": self.tokenizer_parity, "evaluation": self.evaluation}  # fmt: skip
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    def text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)
