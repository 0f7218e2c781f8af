"""`mobilize verify`: a package is what its manifest says, byte for byte, before anything loads it."""

from __future__ import annotations

import os
from pathlib import Path

from mobilize.errors import MobilizeError
from mobilize.manifest import MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE, Manifest
from mobilize.safe_io import quoted, read_bytes, sha256_file
from mobilize.targets.registry import runtime

__all__ = ["MANIFEST", "SIGNATURE", "check_signature", "manifest_digest", "sha256_file", "signer", "verify_package"]
# The names a package holds besides its format's model files (targets/<format>/runtime.py: MODEL_FILES); the
# tokenizer's as the source has them. Nothing else may be in a package.
COMMON_FILES = frozenset({
    "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja",
})  # fmt: skip


def manifest_digest(path: Path) -> str:
    return sha256_file(path / MANIFEST)


def verify_package(path: str | Path, check_io: bool = True, key: Path | None = None) -> Manifest:
    """Check everything a runtime will read before anything loads it: the signature of the manifest (with `key`,
    an OpenSSH public key), the manifest's schema, that the package holds only the files export writes, as
    regular files (no symlinks), each of the size and sha256 the manifest lists, and (`check_io`; a device
    checks the bytes only, with none of the model parsers) the format's own checks (its runtime module's
    `check`: the model's inputs and outputs are the manifest's, what the runtime reads stays inside the package)
    and that the manifest's sizes are the model's. Returns the manifest; raises MobilizeError."""
    path = Path(path)
    if not path.is_dir():
        raise MobilizeError(f"{quoted(path)} is not a package directory")
    if key is not None:
        check_signature(path, key)
    manifest = Manifest.read(path)
    side = runtime(manifest.format)
    allowed = COMMON_FILES | set(side.MODEL_FILES)
    files = manifest.files
    for name in sorted(files):
        if name not in allowed:
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
        if size != entry.bytes:
            raise MobilizeError(f"{quoted(path)}: {name} has {size} bytes, the manifest says {entry.bytes}")
        if sha256_file(file) != entry.sha256:
            raise MobilizeError(
                f"{quoted(path)}: {name} does not match its sha256 in the manifest (modified or corrupt)"
            )
    if not check_io:
        return manifest
    wrong = _check_describes_io(manifest, side.CACHE_INPUTS)
    if wrong:
        raise MobilizeError(f"{quoted(path)}: the manifest's {', '.join(wrong)} disagree with the model's I/O")
    side.check(path, manifest)  # the model's own I/O is the manifest's, and what its runtime reads is export's
    return manifest


def _check_describes_io(manifest: Manifest, cache_prefix: str) -> list[str]:
    """The manifest's architecture and cache say what its inputs and outputs say (which the format's check then
    holds against the model file): an edited vocabulary size, head count or cache length is refused."""
    arch, kv = manifest.architecture, manifest.kv_cache
    logits = manifest.io.output("logits")
    caches = [i for i in manifest.io.inputs if i.name.startswith(cache_prefix)]
    facts = {
        "vocab_size": logits is not None and logits.shape[-1:] == (arch.vocab_size,),
        "num_layers": len(caches) == 2 * arch.num_layers,
        "num_kv_heads": all(len(c.shape) == 4 and c.shape[1] == arch.num_kv_heads for c in caches),
        "head_dim": all(len(c.shape) == 4 and c.shape[3] == arch.head_dim for c in caches),
    }
    if kv.layout == "static":
        lengths = [c.shape[2] for c in caches if len(c.shape) == 4 and isinstance(c.shape[2], int)]
        facts["max_seq_len"] = max(lengths, default=None) == manifest.target.max_seq_len == kv.max_seq_len
        dtype = {"float32": "FLOAT", "float16": "FLOAT16"}[kv.dtype]
        facts["kv_cache.dtype"] = all(c.dtype == dtype for c in caches)
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
