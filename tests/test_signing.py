"""Signed packages: OpenSSH's signature format, checked both ways with the standard tool (ssh-keygen -Y)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mobilize.driver import ExportOptions, export
from mobilize.errors import MobilizeError
from mobilize.package.signing import NAMESPACE
from mobilize.package.verify import SIGNATURE, verify_package


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("key", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name)], check=True)
    return d


@pytest.fixture(scope="module")
def signed(keys, tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "pkg"
    return export(ExportOptions(str(tiny_hf("llama")), out, quant="int8", max_seq_len=32, sign=keys / "key"))


def _ssh_keygen(*args: str, stdin: Path) -> subprocess.CompletedProcess:
    with open(stdin, "rb") as f:
        return subprocess.run(["ssh-keygen", "-Y", *args], stdin=f, capture_output=True, text=True, timeout=60)


def test_ssh_keygen_verifies_what_mobilize_signs(signed, keys, tmp_path):
    manifest, sig = signed / "manifest.json", signed / SIGNATURE
    r = _ssh_keygen("check-novalidate", "-n", NAMESPACE.decode(), "-f", str(keys / "key.pub"), "-s", str(sig),
                    stdin=manifest)  # fmt: skip
    assert r.returncode == 0 and "Good" in r.stdout + r.stderr, r.stderr
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"dev@example {(keys / 'key.pub').read_text()}")
    r = _ssh_keygen("verify", "-f", str(allowed), "-I", "dev@example", "-n", NAMESPACE.decode(), "-s", str(sig),
                    stdin=manifest)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (tmp_path / "edited.json").write_bytes(manifest.read_bytes().replace(b'"int8"', b'"int4"'))
    r = _ssh_keygen("check-novalidate", "-n", NAMESPACE.decode(), "-f", str(keys / "key.pub"), "-s", str(sig),
                    stdin=tmp_path / "edited.json")  # fmt: skip
    assert r.returncode != 0


def test_mobilize_verifies_what_ssh_keygen_signs(signed, keys, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(signed, pkg)
    (pkg / SIGNATURE).unlink()
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(keys / "key"), "-n", NAMESPACE.decode(),
                    str(pkg / "manifest.json")], check=True, capture_output=True)  # fmt: skip
    assert verify_package(pkg, key=keys / "key.pub").recipe.name == "int8"
    with pytest.raises(MobilizeError, match="not by the given key"):
        verify_package(pkg, key=keys / "other.pub")


def test_any_manifest_edit_is_refused(signed, keys, tmp_path):
    import shutil

    edits = (("recipe", {"name": "fp32", "description": "no quantization"}),
             ("source", {"id": "meta-llama/Llama-3-8B", "format": "hf"}))  # fmt: skip
    for field, value in edits:
        pkg = tmp_path / field
        shutil.copytree(signed, pkg)
        m = json.loads((pkg / "manifest.json").read_text())
        m[field] = value
        (pkg / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        verify_package(pkg)  # without a key, an edit that stays consistent with the files passes...
        with pytest.raises(MobilizeError, match="changed after it was signed"):
            verify_package(pkg, key=keys / "key.pub")  # ...with one it does not
        r = subprocess.run([sys.executable, "-m", "mobilize.cli", "run", str(pkg), "--key", str(keys / "key.pub"),
                            "-p", "hi"], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 1 and "changed after it was signed" in r.stderr and len(r.stderr.splitlines()) == 1
