"""Any bytes given to the checkpoint parsers end in a result or a MobilizeError: never another
exception, never a large allocation (mutations of real tiny files, bounded in time for CI)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobilize.errors import MobilizeError
from mobilize.frontend.sources.gguf_file import read_gguf
from mobilize.frontend.sources.safetensors_file import read_safetensors

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutations(size_hint: int):
    """A truncation point and a few byte overwrites, concentrated in the header."""
    return st.tuples(
        st.integers(0, size_hint),
        st.lists(st.tuples(st.integers(0, 2048), st.integers(0, 255)), max_size=8),
    )


def _mutate(data: bytes, cut: int, edits) -> bytes:
    buf = bytearray(data[: max(cut, 0)] if cut < len(data) else data)
    for at, value in edits:
        if at < len(buf):
            buf[at] = value
    return bytes(buf)


def _check(reader, data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        path.write_bytes(data)
        try:
            out = reader(str(path))
        except MobilizeError:
            return
        tensors = out[1] if isinstance(out, tuple) else out
        for ref in list(tensors.values())[:4]:  # what parsed must also load, within the file
            try:
                ref.load()
            except MobilizeError:
                pass


@pytest.fixture(scope="module")
def gguf_bytes(tiny_gguf):
    return tiny_gguf("gemma3").read_bytes()


@pytest.fixture(scope="module")
def safetensors_bytes(tiny_hf):
    return (tiny_hf("llama") / "model.safetensors").read_bytes()


@_SETTINGS
@given(m=_mutations(200_000))
def test_gguf_mutations(gguf_bytes, m):
    _check(read_gguf, _mutate(gguf_bytes, *m), ".gguf")


@_SETTINGS
@given(m=_mutations(200_000))
def test_safetensors_mutations(safetensors_bytes, m):
    _check(read_safetensors, _mutate(safetensors_bytes, *m), ".safetensors")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    _check(read_gguf, b"GGUF" + data, ".gguf")
    _check(read_safetensors, data, ".safetensors")
