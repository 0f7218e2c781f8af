"""The typed manifest: what export writes parses and writes back byte for byte, in both formats, and a manifest
with a missing or mistyped field is one error naming the field, from the library and from the command line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from mobilize.driver import ExportOptions, export
from mobilize.errors import MobilizeError
from mobilize.manifest import MANIFEST, Manifest
from mobilize.package.verify import verify_package


@pytest.fixture(scope="module")
def packages(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    made = {}
    for fmt in ("onnx", "tflite"):
        opts = ExportOptions(str(tiny_hf("gemma3")), out / fmt, quant="int4", format=fmt, max_seq_len=64)
        made[fmt] = export(opts)  # the android preset: a plan and a fit in the manifest
    made["slots"] = export(ExportOptions(str(tiny_hf("llama")), out / "slots", quant="int8", format="onnx",
                                         target="host", max_seq_len=32, lora_slots=4))  # fmt: skip
    return made


@pytest.mark.parametrize("which", ["onnx", "tflite", "slots"])
def test_what_export_writes_reads_back_byte_for_byte(packages, which):
    path = packages[which]
    text = (path / MANIFEST).read_text()
    manifest = Manifest.read(path)
    assert manifest.text() == text
    assert manifest.format == (which if which != "slots" else "onnx")
    assert manifest.architecture.family == ("llama" if which == "slots" else "gemma3")
    assert manifest.kv_cache.layout == "static" and manifest.kv_cache.max_seq_len == manifest.target.max_seq_len
    assert (manifest.lora_slots is not None) == (which == "slots")
    assert set(manifest.files) == {p.name for p in path.iterdir()} - {MANIFEST}


MUTATIONS = [
    # (what is done to the JSON, the field the error names)
    (lambda m: m.pop("architecture"), "'architecture' is missing or not an object"),
    (lambda m: m["architecture"].pop("vocab_size"), "'architecture.vocab_size' is missing or not an integer"),
    (lambda m: m["architecture"].update(num_layers="18"), "'architecture.num_layers' is missing or not an integer"),
    (lambda m: m["target"].update(max_seq_len=True), "'target.max_seq_len' is missing or not an integer"),
    (lambda m: m["target"].update(threads=2.0), "'target.threads' is missing or not an integer"),
    (lambda m: m["kv_cache"].update(dtype="bfloat16"), "'kv_cache.dtype' is missing or not 'float32' or 'float16'"),
    (lambda m: m["kv_cache"].update(layout="paged"), "'kv_cache.layout' is missing or not 'static' or 'dynamic'"),
    (lambda m: m["io"]["inputs"][0].update(shape="1x7"), "'io.inputs[0].shape' is missing or not a list"),
    (lambda m: m["io"].update(outputs={}), "'io.outputs' is missing or not a list of tensors"),
    (lambda m: m["files"]["README.md"].pop("sha256"), "'files.README.md.sha256' is missing or not a string"),
    (lambda m: m["source"].update(adapters=["x"]), "'source.adapters' is missing or not a list of adapter records"),
    (lambda m: m.update(tokenizer="tokenizer.json"), "'tokenizer' is missing or not a list of strings"),
    (lambda m: m.update(lora_slots={"rank": 4}), "'lora_slots.targets' is missing or not a list of strings"),
    (lambda m: m.update(schema_version=2), "manifest schema 2 (this mobilize reads 1)"),
    (lambda m: m.clear() or m.update(a=[]), "'schema_version' is missing or not an integer"),
]


@pytest.mark.parametrize(("mutate", "expected"), MUTATIONS, ids=[e for _, e in MUTATIONS])
def test_a_bad_field_is_named(packages, mutate, expected):
    data = json.loads((packages["onnx"] / MANIFEST).read_text())
    mutate(data)
    with pytest.raises(MobilizeError) as e:
        Manifest.parse(data, "pkg/manifest.json")
    assert str(e.value).startswith("pkg/manifest.json") and expected in str(e.value), str(e.value)


def test_the_command_line_says_it_in_one_line(packages, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(packages["tflite"], pkg)
    data = json.loads((pkg / MANIFEST).read_text())
    data["target"]["max_seq_len"] = "64"
    (pkg / MANIFEST).write_text(json.dumps(data))
    for command in ("verify", "fit", "bench", "eval"):
        r = subprocess.run([sys.executable, "-m", "mobilize.cli", command, str(pkg)], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (command, r.stderr)
        assert "'target.max_seq_len' is missing or not an integer" in lines[0], lines[0]


def test_an_unknown_format_is_refused(packages, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(packages["onnx"], pkg)
    data = json.loads((pkg / MANIFEST).read_text())
    data["format"] = "coreml"
    (pkg / MANIFEST).write_text(json.dumps(data))
    from mobilize.targets.registry import TARGETS

    with pytest.raises(MobilizeError, match=rf"unknown package format 'coreml' \(known: {', '.join(TARGETS)}\)"):
        verify_package(pkg)


def test_a_file_of_the_other_format_is_refused(packages, tmp_path):
    """Each format allows its own model files only: an ONNX package listing a model.tflite is not one export wrote."""
    import shutil

    from mobilize.safe_io import sha256_file

    pkg = tmp_path / "pkg"
    shutil.copytree(packages["onnx"], pkg)
    shutil.copy(packages["tflite"] / "model.tflite", pkg / "model.tflite")
    data = json.loads((pkg / MANIFEST).read_text())
    data["files"]["model.tflite"] = {"bytes": (pkg / "model.tflite").stat().st_size,
                                     "sha256": sha256_file(pkg / "model.tflite")}  # fmt: skip
    (pkg / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(MobilizeError, match="'model.tflite' is not a file a package has"):
        verify_package(pkg)


def test_parse_does_not_change_what_it_reads(packages):
    data = json.loads((packages["tflite"] / MANIFEST).read_text())
    before = copy.deepcopy(data)
    assert Manifest.parse(data).to_json() == before and data == before
