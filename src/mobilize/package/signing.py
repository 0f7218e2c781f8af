"""Signed packages: the manifest (which holds every file's sha256) signed in OpenSSH's signature format
(PROTOCOL.sshsig, as `ssh-keygen -Y sign` writes it), so that anyone can check a package with the standard
tool as well as with `mobilize verify --key`:

    ssh-keygen -Y check-novalidate -n mobilize-package -f key.pub -s manifest.json.sig < manifest.json

The signature algorithms are the `cryptography` library's (Ed25519 keys); this module only frames its bytes."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from pathlib import Path

from mobilize.errors import MobilizeError
from mobilize.safe_io import quoted, read_bytes

NAMESPACE = b"mobilize-package"
_MAGIC = b"SSHSIG"
_HASH = b"sha512"
_KEY_TYPE = b"ssh-ed25519"
_BEGIN, _END = "-----BEGIN SSH SIGNATURE-----", "-----END SSH SIGNATURE-----"
_MAX_KEY_BYTES = 64 << 10
PASSPHRASE_ENV = "MOBILIZE_KEY_PASSPHRASE"


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise MobilizeError(f"{self.what} is not an SSH signature (truncated or malformed)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> bytes:
        return self.take(struct.unpack(">I", self.take(4))[0])


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MobilizeError("signing needs the cryptography package: pip install 'cryptography>=42,<51'") from None
    return serialization, ed25519, InvalidSignature


def _public_blob(public_key) -> bytes:
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _string(_KEY_TYPE) + _string(raw)


def fingerprint(blob: bytes) -> str:
    """As ssh-keygen -l prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_signing_key(path: Path):
    """An Ed25519 private key in OpenSSH's format (ssh-keygen -t ed25519) or PKCS#8 PEM; a passphrase, if
    it has one, from $MOBILIZE_KEY_PASSPHRASE."""
    serialization, ed25519, _ = _crypto()
    data = read_bytes(Path(path), _MAX_KEY_BYTES)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    password = passphrase.encode() if passphrase else None
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=password)
        else:
            key = serialization.load_pem_private_key(data, password=password)
    except TypeError:  # encrypted without a passphrase, or a passphrase for a key that has none
        raise MobilizeError(
            f"{quoted(path)}: the key is encrypted and ${PASSPHRASE_ENV} is not set (or is set for a key that "
            "has no passphrase)"
        ) from None
    except ValueError as e:
        reason = str(e).splitlines()[0][:120] if str(e) else "unreadable"
        raise MobilizeError(f"{quoted(path)} is not a private key mobilize can read ({reason})") from None
    except Exception as e:  # the library's parsers raise others on corrupt input
        raise MobilizeError(f"{quoted(path)} is not a private key mobilize can read ({type(e).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise MobilizeError(f"{quoted(path)}: only Ed25519 keys sign packages (make one: ssh-keygen -t ed25519)")
    return key


def load_public_key(path: Path) -> bytes:
    """The key's wire blob, from an OpenSSH public key line (`ssh-ed25519 AAAA... comment`, as in key.pub)."""
    serialization, ed25519, _ = _crypto()
    data = read_bytes(Path(path), _MAX_KEY_BYTES)
    try:
        key = serialization.load_ssh_public_key(data.strip().splitlines()[0] if data.strip() else b"")
    except Exception:  # ValueError, UnsupportedAlgorithm, ...: one line either way
        raise MobilizeError(
            f"{quoted(path)} is not an OpenSSH public key (expected a line like 'ssh-ed25519 AAAA...')"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise MobilizeError(f"{quoted(path)}: only Ed25519 keys sign packages")
    return _public_blob(key)


def _signed_data(message: bytes) -> bytes:
    return _MAGIC + _string(NAMESPACE) + _string(b"") + _string(_HASH) + _string(hashlib.sha512(message).digest())


def sign_manifest(key, message: bytes) -> bytes:
    """The armored signature of `message`, as `ssh-keygen -Y sign -n mobilize-package` writes it."""
    signature = _string(_KEY_TYPE) + _string(key.sign(_signed_data(message)))
    blob = (
        _MAGIC + struct.pack(">I", 1) + _string(_public_blob(key.public_key())) + _string(NAMESPACE) + _string(b"")
        + _string(_HASH) + _string(signature)
    )  # fmt: skip
    text = base64.b64encode(blob).decode()
    return (_BEGIN + "\n" + "\n".join(text[i : i + 70] for i in range(0, len(text), 70)) + "\n" + _END + "\n").encode()


def signer_of(armored: bytes, what: str) -> bytes:
    """The public key blob a signature names (not yet checked)."""
    return _parse(armored, what)[0]


def _parse(armored: bytes, what: str) -> tuple[bytes, bytes]:
    """(the signer's public key blob, the Ed25519 signature bytes)"""
    text = armored.decode("ascii", errors="replace").strip()
    if not (text.startswith(_BEGIN) and text.endswith(_END)):
        raise MobilizeError(f"{what} is not an SSH signature")
    try:
        blob = base64.b64decode("".join(text[len(_BEGIN) : -len(_END)].split()), validate=True)
    except ValueError:
        raise MobilizeError(f"{what} is not an SSH signature (bad base64)") from None
    r = _Reader(blob, what)
    if r.take(6) != _MAGIC or struct.unpack(">I", r.take(4))[0] != 1:
        raise MobilizeError(f"{what} is not an SSH signature of version 1")
    public, namespace, _reserved, hash_alg, signature = r.string(), r.string(), r.string(), r.string(), r.string()
    if namespace != NAMESPACE:
        raise MobilizeError(f"{what} was made for {namespace[:40]!r}, not for a mobilize package")
    if hash_alg != _HASH:
        raise MobilizeError(f"{what} uses hash {hash_alg[:20]!r}; mobilize signs with sha512")
    s = _Reader(signature, what)
    if s.string() != _KEY_TYPE:
        raise MobilizeError(f"{what}: only Ed25519 signatures are accepted")
    return public, s.string()


def verify_signature(armored: bytes, message: bytes, public_blob: bytes, what: str) -> None:
    """Raises MobilizeError unless `armored` is a signature of `message` by the key `public_blob`."""
    _, ed25519, invalid = _crypto()
    public, sig = _parse(armored, what)
    if public != public_blob:
        raise MobilizeError(f"{what} is by key {fingerprint(public)}, not by the given key {fingerprint(public_blob)}")
    raw = _Reader(public, what)
    raw.string()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw.string()).verify(sig, _signed_data(message))
    except (invalid, ValueError):
        raise MobilizeError(
            f"{what} does not match the manifest: the package was changed after it was signed"
        ) from None
