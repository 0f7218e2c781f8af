"""Hostile and careless input, end to end through the installed command line: every case is run as a user would
run it, in its own process, with bounded time (60 s) and address space (2 GiB), and must give its expected
outcome: a refusal is exit 1 and one line `mobilize: error: ...` naming the reason, a valid input works. No case
may print a traceback, leave a partial or set-aside directory, or change or delete a file it did not ask to
write. (tests/test_malformed_corpus.py holds the parsers' own corpus; this one covers the classes of issue 18:
data loss, forgery, leaks, tracebacks, wrong models, hangs and blow-ups.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
MOBILIZE = [sys.executable, "-m", "mobilize.cli"]
TIMEOUT_S = 60
ADDRESS_SPACE = 2 << 30
EXPORT = ["--max-seq-len", "64", "-q", "int8"]


# ---- the shared, read-only inputs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_hf, tmp_path_factory) -> Path:
    """A tiny llama with a word-level tokenizer, its GGUF, packages of both formats (one signed), keys."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("hostile-base")
    src = root / "llama"
    shutil.copytree(tiny_hf("llama"), src)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(97)] + ["Paris", "London", "the", "capital", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    config = json.loads((src / "config.json").read_text())
    config |= {"bos_token_id": 1, "eos_token_id": 2}
    (src / "config.json").write_text(json.dumps(config))
    from helpers import write_tiny_gguf

    from mobilize.frontend.families.registry import FAMILIES

    write_tiny_gguf(FAMILIES["llama"].tiny(), src, root / "llama.gguf")
    for name in ("key", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(root / name)], check=True)
    for fmt in ("onnx", "tflite"):
        _ok(_cli("export", str(src), *EXPORT, "--format", fmt, "--out", str(root / f"pkg-{fmt}"), "--sign",
                 str(root / "key")))  # fmt: skip
    return root


# The address-space limit set by the child itself before it becomes mobilize (a preexec_fn is not safe with the
# threads the corpus runs its cases on).
_LIMITED = (
    f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE})); "
    "os.execv(sys.executable, [sys.executable, '-m', 'mobilize.cli', *sys.argv[1:]])"
)


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _LIMITED, *args], capture_output=True, cwd=cwd, env=env, timeout=TIMEOUT_S,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
    )  # fmt: skip


def _ok(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "Traceback" not in err, err
    return r.stdout.decode(errors="replace")


# ---- the cases --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    id: str
    setup: Callable[[Path, Path], list[str]]  # (case dir, base) -> the command's arguments
    needle: str  # in the error line (a refusal), or in stdout (a valid input)
    ok: bool = False
    env: dict | None = None


CASES: list[Case] = []


def case(id: str, needle: str, ok: bool = False, env: dict | None = None):
    def add(setup):
        CASES.append(Case(id, setup, needle, ok, env))
        return setup

    return add


def refuse(id: str, args: Callable[[Path, Path], list[str]], needle: str) -> None:
    CASES.append(Case(id, args, needle))


def _model(w: Path, b: Path, edit: Callable[[dict], None] | None = None) -> Path:
    m = w / "m"
    shutil.copytree(b / "llama", m)
    if edit is not None:
        config = json.loads((m / "config.json").read_text())
        edit(config)
        (m / "config.json").write_text(json.dumps(config))
    return m


def _export(m: Path | str, w: Path, *extra: str) -> list[str]:
    return ["export", str(m), *EXPORT, "--out", str(w / "out"), *extra]


# -- command-line usage: one line, exit 1, whatever click typer bundles
USAGE = {  # fmt: skip
    "run -n 0": (["run", "{pkg}", "-p", "hi", "-n", "0"], "max-new-tokens"),
    "run -n -3": (["run", "{pkg}", "-p", "hi", "-n", "-3"], "max-new-tokens"),
    "run -n abc": (["run", "{pkg}", "-p", "hi", "-n", "abc"], "max-new-tokens"),
    "run -n huge": (["run", "{pkg}", "-p", "hi", "-n", "99999999999"], "max-new-tokens"),
    "run without --prompt": (["run", "{pkg}"], "--prompt"),
    "run --threads 10000": (["run", "{pkg}", "-p", "hi", "--threads", "10000"], "threads"),
    "run --threads -1": (["run", "{pkg}", "-p", "hi", "--threads", "-1"], "threads"),
    "unknown option": (["export", "{src}", "--frobnicate"], "frobnicate"),
    "unknown command": (["transmogrify"], "transmogrify"),
    "export --max-seq-len abc": (["export", "{src}", "--max-seq-len", "abc"], "max-seq-len"),
    "export --max-seq-len 0": (["export", "{src}", "--max-seq-len", "0", "--out", "{w}/out"], "max-seq-len"),
    "export --max-seq-len -5": (["export", "{src}", "--max-seq-len", "-5", "--out", "{w}/out"], "max-seq-len"),
    "export --max-seq-len 2^40": (
        ["export", "{src}", "--max-seq-len", str(1 << 40), "--out", "{w}/out"], "max-seq-len"),
    "export --quant int9": (["export", "{src}", "-q", "int9", "--out", "{w}/out"], "int9"),
    "export --target mars": (["export", "{src}", "-t", "mars", "--out", "{w}/out"], "mars"),
    "export --format zip": (["export", "{src}", "-f", "zip", "--out", "{w}/out"], "zip"),
    "export --opset foo": (["export", "{src}", "--opset", "foo", "--out", "{w}/out"], "foo"),
    "export --kv-dtype int3": (["export", "{src}", "--kv-dtype", "int3", "--out", "{w}/out"], "int3"),
    "export --logits some": (["export", "{src}", "--logits", "some", "--out", "{w}/out"], "some"),
    "export --bundle zip": (["export", "{src}", "-f", "tflite", "--bundle", "zip", "--out", "{w}/out"], "zip"),
    "export --prefill-len 0": (
        ["export", "{src}", "-f", "tflite", "--prefill-len", "0", "--out", "{w}/out"], "prefill"),
    "export --prefill-len 2^30": (
        ["export", "{src}", "-f", "tflite", "--prefill-len", str(1 << 30), "--out", "{w}/out"], "prefill"),
    "bench --prompt-len 0": (["bench", "{pkg}", "--prompt-len", "0"], "prompt-len"),
    "bench --prompt-len 2^40": (["bench", "{pkg}", "--prompt-len", str(1 << 40)], "prompt-len"),
    "bench --repeats 0": (["bench", "{pkg}", "--repeats", "0"], "repeats"),
    "bench --runtime warp": (["bench", "{pkg}", "--runtime", "warp"], "warp"),
    "eval --chunk 1": (["eval", "{pkg}", "--chunk", "1"], "chunk"),
    "eval --max-ppl-increase lots": (["eval", "{pkg}", "--max-ppl-increase", "lots"], "lots"),
    "eval --texts unknown": (["eval", "{pkg}", "--texts", "poetry"], "poetry"),
    "fit --device mars": (["fit", "{pkg}", "--device", "mars"], "mars"),
    "inspect --json with an argument": (["inspect", "--json=yes", "{src}"], "json"),
}
for _id, (_args, _needle) in USAGE.items():
    refuse(
        f"usage: {_id}",
        lambda w, b, a=_args: [x.format(pkg=b / "pkg-onnx", src=b / "llama", w=w) for x in a],
        _needle,
    )


# -- paths that are not what they seem
@case("source: a FIFO as the GGUF", "not a regular file")
def _(w, b):
    os.mkfifo(w / "model.gguf")
    return _export(w / "model.gguf", w)


for _name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json", "special_tokens_map.json"):  # fmt: skip

    def _fifo(w, b, name=_name):
        m = _model(w, b)
        (m / name).unlink(missing_ok=True)
        os.mkfifo(m / name)
        return _export(m, w)

    refuse(f"source: a FIFO as {_name}", _fifo, "not a regular file")


@case("source: /dev/zero", "not a regular file")
def _(w, b):
    return _export("/dev/zero", w)


@case("source: a directory named .gguf", "config.json")
def _(w, b):
    (w / "x.gguf").mkdir()
    return _export(w / "x.gguf", w)


@case("source: an empty file", "GGUF")
def _(w, b):
    (w / "empty.gguf").write_bytes(b"")
    return _export(w / "empty.gguf", w)


@case("source: missing", "neither a file")
def _(w, b):
    return _export(w / "nothing-here", w)


@case("source: a newline in its name is escaped", "\\n")
def _(w, b):
    return _export(w / "two\nlines", w)


@case("source: a 100 kB name is cut short", "characters")
def _(w, b):
    return ["inspect", "x" * 100_000]


@case("source: config.json a symlink to a file outside", "outside the model's directory")
def _(w, b):
    m = _model(w, b)
    (w / "elsewhere.json").write_text((m / "config.json").read_text())
    (m / "config.json").unlink()
    (m / "config.json").symlink_to(w / "elsewhere.json")
    return _export(m, w)


@case("leak: tokenizer_config.json a symlink to a credentials file", "outside the model's directory")
def _(w, b):
    m = _model(w, b)
    (w / "credentials").write_text('{"aws_secret_access_key": "SECRET"}')
    (m / "tokenizer_config.json").unlink()
    (m / "tokenizer_config.json").symlink_to(w / "credentials")
    return _export(m, w)


@case("leak: special_tokens_map.json a symlink to /etc/passwd", "outside the model's directory")
def _(w, b):
    m = _model(w, b)
    (m / "special_tokens_map.json").symlink_to("/etc/passwd")
    return _export(m, w)


@case("source: a symlink within the model directory is followed", "wrote", ok=True)
def _(w, b):
    m = _model(w, b)
    (m / "real-tokenizer.json").write_bytes((m / "tokenizer.json").read_bytes())
    (m / "tokenizer.json").unlink()
    (m / "tokenizer.json").symlink_to("real-tokenizer.json")
    return _export(m, w)


@case("source: a Hugging Face cache snapshot of symlinks into blobs", "wrote", ok=True)
def _(w, b):
    repo = w / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (b / "llama").iterdir():
        shutil.copyfile(f, blobs / f"blob-{f.name}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob-{f.name}")
    return _export(snap, w)


@case("source: a directory symlink given by the user is followed", "wrote", ok=True)
def _(w, b):
    (w / "link").symlink_to(b / "llama")
    return _export(w / "link", w)


# -- config.json: every field type- and range-checked
def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _legacy(key, value):
    """A transformers-4 config (rope_theta and rope_scaling at the top, no rope_parameters), with one value."""

    def edit(c):
        c.pop("rope_parameters", None)
        c["rope_theta"] = 10000.0
        c[key] = value

    return edit


def _rope_parameter(key, value):
    return lambda c: c["rope_parameters"].__setitem__(key, value)


CONFIG_EDITS = {
    "hidden_size a string": (_set("hidden_size", "64"), "hidden_size"),
    "hidden_size a float": (_set("hidden_size", 64.5), "hidden_size"),
    "hidden_size true": (_set("hidden_size", True), "hidden_size"),
    "hidden_size -1": (_set("hidden_size", -1), "hidden_size"),
    "hidden_size 0": (_set("hidden_size", 0), "hidden_size"),
    "hidden_size 1e12": (_set("hidden_size", 10**12), "hidden_size"),
    "hidden_size null": (_set("hidden_size", None), "hidden_size"),
    "vocab_size 0": (_set("vocab_size", 0), "vocab_size"),
    "vocab_size 2^40": (_set("vocab_size", 1 << 40), "vocab_size"),
    "num_hidden_layers a million": (_set("num_hidden_layers", 10**6), "num_hidden_layers"),
    "num_attention_heads 0": (_set("num_attention_heads", 0), "num_attention_heads"),
    "kv heads not dividing heads": (_set("num_key_value_heads", 3), "num_kv_heads"),
    "kv heads a string": (_set("num_key_value_heads", "2"), "num_key_value_heads"),
    "head_dim odd": (_set("head_dim", 15), "head_dim"),
    "head_dim a list": (_set("head_dim", [16]), "head_dim"),
    "rms_norm_eps NaN": (_set("rms_norm_eps", float("nan")), "rms_norm_eps"),
    "rms_norm_eps Infinity": (_set("rms_norm_eps", float("inf")), "rms_norm_eps"),
    "rms_norm_eps 0": (_set("rms_norm_eps", 0), "rms_norm_eps"),
    "rms_norm_eps negative": (_set("rms_norm_eps", -1e-5), "rms_norm_eps"),
    "rms_norm_eps a string": (_set("rms_norm_eps", "1e-5"), "rms_norm_eps"),
    "rope_theta NaN": (_legacy("rope_theta", float("nan")), "rope_theta"),
    "rope_theta 0": (_legacy("rope_theta", 0), "rope_theta"),
    "rope_theta negative": (_legacy("rope_theta", -10000.0), "rope_theta"),
    "rope_theta -Infinity": (_legacy("rope_theta", float("-inf")), "rope_theta"),
    "rope_theta an object": (_legacy("rope_theta", {"base": 1}), "rope_theta"),
    "tie_word_embeddings 'false'": (_set("tie_word_embeddings", "false"), "tie_word_embeddings"),
    "tie_word_embeddings 1": (_set("tie_word_embeddings", 1), "tie_word_embeddings"),
    "attention_bias 'yes'": (_set("attention_bias", "yes"), "attention_bias"),
    "hidden_act relu": (_set("hidden_act", "relu"), "relu"),
    "hidden_act gelu (exact)": (_set("hidden_act", "gelu"), "gelu"),
    "hidden_act a number": (_set("hidden_act", 5), "hidden_act"),
    "rope_scaling a list": (_legacy("rope_scaling", [8.0]), "rope_scaling"),
    "rope_scaling a string": (_legacy("rope_scaling", "llama3"), "rope_scaling"),
    "rope_scaling yarn": (_legacy("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), "yarn"),
    "rope_scaling llama3 without fields": (_legacy("rope_scaling", {"rope_type": "llama3", "factor": 8.0}), "llama3"),
    "rope_scaling llama3 factor NaN": (
        _legacy("rope_scaling", {"rope_type": "llama3", "factor": float("nan"), "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "factor"),
    "rope_scaling llama3 high below low": (
        _legacy("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                              "high_freq_factor": 1.0, "original_max_position_embeddings": 64}), "high_freq_factor"),
    "rope_scaling linear factor 0": (_legacy("rope_scaling", {"rope_type": "linear", "factor": 0}), "factor"),
    "rope_scaling without a type": (_legacy("rope_scaling", {"factor": 2.0}), "rope_scaling"),
    "rope_parameters a list": (_set("rope_parameters", [1, 2]), "rope_parameters"),
    "rope_parameters rope_theta NaN": (_rope_parameter("rope_theta", float("nan")), "rope_theta"),
    "rope_parameters rope_theta a string": (_rope_parameter("rope_theta", "1e4"), "rope_theta"),
    "rope_parameters rope_type yarn": (_rope_parameter("rope_type", "yarn"), "yarn"),
    "rope_parameters llama3 without fields": (_rope_parameter("rope_type", "llama3"), "llama3"),
    "layer_types too few": (_set("layer_types", ["full_attention"]), "layer_types"),
    "layer_types unknown kind": (_set("layer_types", ["full_attention", "cross_attention"]), "layer_types"),
    "layer_types a string": (_set("layer_types", "full_attention"), "layer_types"),
    "max_position_embeddings 0": (_set("max_position_embeddings", 0), "max_position_embeddings"),
    "max_position_embeddings -5": (_set("max_position_embeddings", -5), "max_position_embeddings"),
    "max_position_embeddings a string": (_set("max_position_embeddings", "4096"), "max_position_embeddings"),
    "model_type a number": (_set("model_type", 7), "model_type"),
    "model_type a list": (_set("model_type", ["llama"]), "model_type"),
    "model_type unknown": (_set("model_type", "mamba"), "mamba"),
    "model_type missing": (lambda c: c.pop("model_type"), "model_type"),
    "eos_token_id out of range": (_set("eos_token_id", 500), "eos_token_id"),
    "eos_token_id negative": (_set("eos_token_id", -1), "eos_token_id"),
    "eos_token_id a string": (_set("eos_token_id", "2"), "eos_token_id"),
    "bos_token_id true": (_set("bos_token_id", True), "bos_token_id"),
    "eos_token_id list with one out of range": (_set("eos_token_id", [2, 9999]), "eos_token_id"),
}
def _config_case(w: Path, b: Path, edit) -> list[str]:
    m = _model(w, b, edit)
    (m / "generation_config.json").unlink()  # (its ids would take precedence over config.json's)
    return _export(m, w)


for _id, (_edit, _needle) in CONFIG_EDITS.items():
    refuse(f"config: {_id}", lambda w, b, e=_edit: _config_case(w, b, e), _needle)


@case("config: not JSON", "not valid JSON")
def _(w, b):
    m = _model(w, b)
    (m / "config.json").write_text("{model_type: llama")
    return _export(m, w)


@case("config: a JSON array", "not a JSON object")
def _(w, b):
    m = _model(w, b)
    (m / "config.json").write_text("[1, 2]")
    return _export(m, w)


@case("config: not UTF-8", "not valid JSON")
def _(w, b):
    m = _model(w, b)
    (m / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    return _export(m, w)


@case("config: nested 100000 deep", "JSON")
def _(w, b):
    m = _model(w, b)
    (m / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return _export(m, w)


@case("config: 40 MB, refused before it is parsed", "bytes")
def _(w, b):
    m = _model(w, b)
    (m / "config.json").write_text('{"pad": "' + "x" * (40 << 20) + '"}')
    return _export(m, w)


@case("config: NaN weights", "NaN")
def _(w, b):
    from safetensors.numpy import load_file, save_file

    m = _model(w, b)
    tensors = load_file(str(m / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(m / "model.safetensors"))
    return _export(m, w)


@case("config: an infinite weight", "infinite")
def _(w, b):
    from safetensors.numpy import load_file, save_file

    m = _model(w, b)
    tensors = load_file(str(m / "model.safetensors"))
    tensors["model.norm.weight"][0] = np.inf
    save_file(tensors, str(m / "model.safetensors"))
    return _export(m, w)


@case("config: a transformers-4 config with llama3 rope scaling exports", "wrote", ok=True)
def _(w, b):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    return _export(_model(w, b, _legacy("rope_scaling", scaling)), w)


@case("config: tie_word_embeddings false keeps the real lm_head", "wrote", ok=True)
def _(w, b):
    return _export(_model(w, b, _set("tie_word_embeddings", False)), w)


# -- the index of a sharded checkpoint
INDEX_EDITS = {
    "weight_map values are numbers": ({"model.norm.weight": 3}, "shard name"),
    "weight_map values are lists": ({"model.norm.weight": ["model.safetensors"]}, "shard name"),
    "weight_map points outside": ({"model.norm.weight": "../model.safetensors"}, "plain file name"),
    "weight_map an absolute path": ({"model.norm.weight": "/etc/passwd"}, "plain file name"),
    "weight_map a missing shard": ({"model.norm.weight": "model-2.safetensors"}, "no such file"),
}
for _id, (_map, _needle) in INDEX_EDITS.items():

    def _index(w, b, weight_map=_map):
        m = _model(w, b)
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return _export(m, w)

    refuse(f"index: {_id}", _index, _needle)


@case("index: weight_map not an object", "weight_map")
def _(w, b):
    m = _model(w, b)
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    return _export(m, w)


# -- tokenizer files
@case("tokenizer: tokenizer.json not JSON", "not valid JSON")
def _(w, b):
    m = _model(w, b)
    (m / "tokenizer.json").write_text("{")
    return _export(m, w)


@case("tokenizer: tokenizer.json an object no library loads", "tokenizers library")
def _(w, b):
    m = _model(w, b)
    (m / "tokenizer.json").write_text('{"model": 5}')
    return _export(m, w)


@case("tokenizer: 10 tokens for a 128-row embedding", "not this model's tokenizer")
def _(w, b):
    from tokenizers import Tokenizer, models

    m = _model(w, b)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(10)}, unk_token="t0")).save(str(m / "tokenizer.json"))
    return _export(m, w)


@case("tokenizer: more tokens than the embedding has rows", "past the table")
def _(w, b):
    from tokenizers import Tokenizer, models

    m = _model(w, b)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(300)}, unk_token="t0")).save(str(m / "tokenizer.json"))
    return _export(m, w)


@case("tokenizer: an integer eos_token", "eos_token")
def _(w, b):
    m = _model(w, b)
    (m / "tokenizer_config.json").write_text(json.dumps({"eos_token": 2}))
    return _export(m, w)


@case("tokenizer: tokenizer_config.json not UTF-8", "not valid JSON")
def _(w, b):
    m = _model(w, b)
    (m / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xff"}')
    return _export(m, w)


@case("tokenizer: generation_config eos out of range", "eos_token_id")
def _(w, b):
    m = _model(w, b)
    (m / "generation_config.json").write_text(json.dumps({"eos_token_id": 100000}))
    return _export(m, w)


@case("tokenizer: generation_config a FIFO", "not a regular file")
def _(w, b):
    m = _model(w, b)
    (m / "generation_config.json").unlink(missing_ok=True)
    os.mkfifo(m / "generation_config.json")
    return _export(m, w)


@case("tokenizer: tokenizer.json of 200 MB", "bytes")
def _(w, b):
    m = _model(w, b)
    with open(m / "tokenizer.json", "wb") as f:
        f.truncate(200 << 20)
    return _export(m, w)


# -- GGUF files, written byte by byte
def _gguf(kvs: list[tuple[str, int, object]], tensors: list[tuple[str, list[int], int, int]], data: bytes,
          version: int = 3, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:  # fmt: skip
    """A GGUF: (key, type id, value) pairs (8 string, 9 array as (item type, [items]), 4 u32, 6 f32, ...), tensor
    infos (name, ggml dims, ggml type, offset) and the data section (aligned to 32)."""

    def string(s: str | bytes) -> bytes:
        raw = s.encode() if isinstance(s, str) else s
        return struct.pack("<Q", len(raw)) + raw

    scalars = {0: "<B", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 12: "<d"}

    def value(t: int, v) -> bytes:
        if t == 8:
            return string(v)
        if t == 9:
            item, items = v
            return struct.pack("<IQ", item, len(items)) + b"".join(value(item, x) for x in items)
        return struct.pack(scalars[t], v)

    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)  # fmt: skip
    for key, t, v in kvs:
        out += string(key) + struct.pack("<I", t) + value(t, v)
    for name, dims, ttype, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


_LLAMA_KVS = [
    ("general.architecture", 8, "llama"), ("llama.block_count", 4, 2), ("llama.context_length", 4, 256),
    ("llama.embedding_length", 4, 64), ("llama.feed_forward_length", 4, 128), ("llama.attention.head_count", 4, 4),
    ("llama.attention.head_count_kv", 4, 2), ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
    ("llama.rope.freq_base", 6, 10000.0), ("llama.vocab_size", 4, 128),
]  # fmt: skip


def _with(kvs, key, t, v):
    return [(k, tt, vv) for k, tt, vv in kvs if k != key] + [(key, t, v)]


def _one_tensor(offset: int = 0, n: int = 64):
    return [("output_norm.weight", [n], 0, offset)], np.ones(n, np.float32).tobytes()


GGUF_CASES = {
    "bad magic": (lambda: b"GGUX" + b"\0" * 60, "GGUF"),
    "version 1": (lambda: _gguf(_LLAMA_KVS, [], b"", version=1), "version"),
    "version 99": (lambda: _gguf(_LLAMA_KVS, [], b"", version=99), "version"),
    "header cut short": (lambda: _gguf(_LLAMA_KVS, [], b"")[:40], "GGUF"),
    "header cut inside a key": (lambda: _gguf(_LLAMA_KVS, [], b"", n_kv=1)[:30], "past the end"),
    "2^60 tensors claimed": (lambda: _gguf(_LLAMA_KVS, [], b"", n_tensors=1 << 60), "tensors"),
    "2^60 keys claimed": (lambda: _gguf(_LLAMA_KVS, [], b"", n_kv=1 << 60), "keys"),
    "a key twice": (lambda: _gguf(_LLAMA_KVS + [("llama.block_count", 4, 3)], [], b""), "twice"),
    "a tensor twice": (
        lambda: _gguf(_LLAMA_KVS, [("a.weight", [8], 0, 0), ("a.weight", [8], 0, 32)], b"\0" * 64), "twice"),
    "tensors overlapping": (
        lambda: _gguf(_LLAMA_KVS, [("a.weight", [16], 0, 0), ("b.weight", [8], 0, 32)], b"\0" * 96), "overlap"),
    "tensor past the end": (lambda: _gguf(_LLAMA_KVS, [("a.weight", [1 << 20], 0, 0)], b"\0" * 64), "more elements"),
    "tensor unaligned": (lambda: _gguf(_LLAMA_KVS, [("a.weight", [8], 0, 4)], b"\0" * 64), "unaligned"),
    "alignment 3": (lambda: _gguf(_LLAMA_KVS + [("general.alignment", 4, 3)], [], b""), "alignment"),
    "unknown ggml type": (lambda: _gguf(_LLAMA_KVS, [("a.weight", [32], 99, 0)], b"\0" * 64), "ggml type"),
    "5 dimensions": (lambda: _gguf(_LLAMA_KVS, [("a.weight", [1, 1, 1, 1, 1], 0, 0)], b"\0" * 64), "dimensions"),
    "architecture a number": (lambda: _gguf(_with(_LLAMA_KVS, "general.architecture", 4, 7), [], b""), "architecture"),
    "architecture unknown": (
        lambda: _gguf(_with(_LLAMA_KVS, "general.architecture", 8, "rwkv"), [], b""), "rwkv"),
    "an array of arrays": (lambda: _gguf(_LLAMA_KVS + [("x.nested", 9, (9, [(4, [1])]))], [], b""), "array of arrays"),
    "tokens that are numbers": (
        lambda: _gguf(_LLAMA_KVS + [("tokenizer.ggml.tokens", 9, (4, list(range(128))))], [], b""), "tokens"),
    "a 1 MiB token": (
        lambda: _gguf(_LLAMA_KVS + [("tokenizer.ggml.tokens", 9, (8, ["a" * (1 << 20)] + ["b"] * 127))], [], b""),
        "no token"),
    "a string of 2^40 bytes": (lambda: _gguf([("general.architecture", 8, "llama")], [], b"")[:24]
                               + struct.pack("<Q", 1 << 40) + b"x" * 64, "absurd"),
    "head_count a string": (lambda: _gguf(_with(_LLAMA_KVS, "llama.attention.head_count", 8, "4"), [], b""),
                            "head_count"),
    "rope base NaN": (lambda: _gguf(_with(_LLAMA_KVS, "llama.rope.freq_base", 6, float("nan")), *_one_tensor()),
                      "rope_theta"),
    "rope base 0": (lambda: _gguf(_with(_LLAMA_KVS, "llama.rope.freq_base", 6, 0.0), *_one_tensor()), "rope_theta"),
    "eps negative": (lambda: _gguf(_with(_LLAMA_KVS, "llama.attention.layer_norm_rms_epsilon", 6, -1.0),
                                   *_one_tensor()), "rms_norm_eps"),
    "eps infinite": (lambda: _gguf(_with(_LLAMA_KVS, "llama.attention.layer_norm_rms_epsilon", 6, float("inf")),
                                   *_one_tensor()), "rms_norm_eps"),
    "context length 0": (lambda: _gguf(_with(_LLAMA_KVS, "llama.context_length", 4, 0), *_one_tensor()),
                         "max_position_embeddings"),
    "bos id a string": (lambda: _gguf(_LLAMA_KVS + [("tokenizer.ggml.bos_token_id", 8, "1")], [], b""), "bos_token_id"),
    "rope scaling yarn": (lambda: _gguf(_LLAMA_KVS + [("llama.rope.scaling.type", 8, "yarn")], *_one_tensor()),
                          "yarn"),
    "tensors missing": (lambda: _gguf(_LLAMA_KVS, *_one_tensor()), "missing"),
}
# an array claiming 2^40 items: the count patched into a real one
GGUF_CASES["an array of 2^40 items"] = (
    lambda: _gguf(_LLAMA_KVS + [("x.arr", 9, (4, [1, 2]))], [], b"").replace(
        struct.pack("<IQ", 4, 2) + struct.pack("<II", 1, 2), struct.pack("<IQ", 4, 1 << 40) + struct.pack("<II", 1, 2)
    ),
    "cannot fit",
)
for _id, (_bytes, _needle) in GGUF_CASES.items():

    def _write_gguf(w, b, make=_bytes):
        (w / "bad.gguf").write_bytes(make())
        return _export(w / "bad.gguf", w)

    refuse(f"gguf: {_id}", _write_gguf, _needle)


@case("gguf: a llama GGUF exports", "wrote", ok=True)
def _(w, b):
    return _export(b / "llama.gguf", w)


# -- installs: only a package is ever replaced
@case("install: --overwrite onto a directory of documents", "not a mobilize package")
def _(w, b):
    (w / "out").mkdir()
    (w / "out" / "thesis.txt").write_text("four years of work")
    return [*_export(b / "llama", w), "--overwrite"]


@case("install: --overwrite onto the source", "holds the source")
def _(w, b):
    m = _model(w, b)
    return ["export", str(m), *EXPORT, "--out", str(m), "--overwrite"]


@case("install: --overwrite onto a directory holding the source", "holds the source")
def _(w, b):
    m = _model(w, b)
    return ["export", str(m), *EXPORT, "--out", str(w), "--overwrite"]


@case("install: --overwrite onto the source GGUF file", "a file")
def _(w, b):
    shutil.copyfile(b / "llama.gguf", w / "m.gguf")
    return ["export", str(w / "m.gguf"), *EXPORT, "--out", str(w / "m.gguf"), "--overwrite"]


@case("install: --overwrite onto a symlink to documents", "symlink")
def _(w, b):
    (w / "docs").mkdir()
    (w / "docs" / "a.txt").write_text("mine")
    (w / "out").symlink_to(w / "docs")
    return [*_export(b / "llama", w), "--overwrite"]


@case("install: --overwrite onto a package with a file of the user's added", "does not list")
def _(w, b):
    shutil.copytree(b / "pkg-onnx", w / "out")
    (w / "out" / "notes.txt").write_text("my notes")
    return [*_export(b / "llama", w), "--overwrite"]


@case("install: onto an empty directory without --overwrite", "already exists")
def _(w, b):
    (w / "out").mkdir()
    return _export(b / "llama", w)


@case("install: onto a package without --overwrite", "already exists")
def _(w, b):
    shutil.copytree(b / "pkg-onnx", w / "out")
    return _export(b / "llama", w)


@case("install: --overwrite replaces a package", "wrote", ok=True)
def _(w, b):
    shutil.copytree(b / "pkg-tflite", w / "out")
    return [*_export(b / "llama", w), "--overwrite"]


@case("install: --out '.'", "already exists")
def _(w, b):
    return ["export", str(b / "llama"), *EXPORT, "--out", "."]


@case("install: a dead export's partial directory is swept", "wrote", ok=True)
def _(w, b):
    (w / ".out.partial-999999999-x").mkdir()
    (w / ".out.partial-999999999-x" / "model.onnx").write_bytes(b"half")
    return _export(b / "llama", w)


@case("install: a dead export's set-aside package is put back first", "already exists")
def _(w, b):
    shutil.copytree(b / "pkg-onnx", w / ".out.old-999999999")
    return _export(b / "llama", w)  # the package is restored at out, which then exists


# -- packages: verify checks everything a runtime reads
def _pkg(w: Path, b: Path, fmt: str = "onnx") -> Path:
    p = w / "pkg"
    shutil.copytree(b / f"pkg-{fmt}", p, symlinks=True)
    return p


def _rehash(p: Path, edit: Callable[[dict], None] | None = None) -> None:
    """What a forger does: change files, then recompute the manifest's hashes (the signature stays)."""
    import hashlib

    m = json.loads((p / "manifest.json").read_text())
    if edit is not None:
        edit(m)
    m["files"] = {
        f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in sorted(p.iterdir()) if f.name not in ("manifest.json", "manifest.json.sig") and f.is_file()
    }  # fmt: skip
    (p / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def _swap_vocab(p: Path) -> None:
    tok = json.loads((p / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["Paris"], vocab["London"] = vocab["London"], vocab["Paris"]
    (p / "tokenizer.json").write_text(json.dumps(tok))


@case("forgery: vocabulary swapped and rehashed: verify --key refuses", "changed after it was signed")
def _(w, b):
    p = _pkg(w, b)
    _swap_vocab(p)
    _rehash(p)
    return ["verify", str(p), "--key", str(b / "key.pub")]


@case("forgery: vocabulary swapped and rehashed: run --key refuses", "changed after it was signed")
def _(w, b):
    p = _pkg(w, b)
    _swap_vocab(p)
    _rehash(p)
    return ["run", str(p), "--key", str(b / "key.pub"), "-p", "the capital is"]


for _field, _edit in {
    "recipe": lambda m: m["recipe"].__setitem__("name", "fp32"),
    "cache length": lambda m: m["target"].__setitem__("max_seq_len", 4096),
    "source id": lambda m: m["source"].__setitem__("id", "meta-llama/Llama-3-8B"),
}.items():

    def _manifest_edit(w, b, edit=_edit):
        p = _pkg(w, b, "tflite")
        _rehash(p, edit)
        return ["verify", str(p), "--key", str(b / "key.pub")]

    refuse(f"forgery: manifest {_field} edited: verify --key refuses", _manifest_edit, "changed after it was signed")


@case("forgery: signed by another key", "not by the given key")
def _(w, b):
    p = _pkg(w, b)
    return ["verify", str(p), "--key", str(b / "other.pub")]


@case("forgery: signature removed: --key refuses", "not signed")
def _(w, b):
    p = _pkg(w, b)
    (p / "manifest.json.sig").unlink()
    return ["verify", str(p), "--key", str(b / "key.pub")]


@case("forgery: signature garbage", "not an SSH signature")
def _(w, b):
    p = _pkg(w, b)
    (p / "manifest.json.sig").write_text("-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n")
    return ["verify", str(p), "--key", str(b / "key.pub")]


@case("forgery: the key file is not a public key", "not an OpenSSH public key")
def _(w, b):
    (w / "k.pub").write_text("hello")
    return ["verify", str(_pkg(w, b)), "--key", str(w / "k.pub")]


@case("forgery: a private key given as --key", "not an OpenSSH public key")
def _(w, b):
    return ["verify", str(_pkg(w, b)), "--key", str(b / "key")]


@case("signing: an unreadable private key", "not a private key")
def _(w, b):
    (w / "k").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n")
    return [*_export(b / "llama", w), "--sign", str(w / "k")]


@case("signing: an RSA key", "Ed25519")
def _(w, b):
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(w / "rsa")], check=True)
    return [*_export(b / "llama", w), "--sign", str(w / "rsa")]


@case("signing: an encrypted key without its passphrase", "encrypted")
def _(w, b):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase", "-f", str(w / "enc")], check=True)
    return [*_export(b / "llama", w), "--sign", str(w / "enc")]


@case("signing: a signed package verifies with its key", "signed by SHA256:", ok=True)
def _(w, b):
    return ["verify", str(_pkg(w, b, "tflite")), "--key", str(b / "key.pub")]


@case("verify: without a key, the manifest's digest is printed", "manifest sha256", ok=True)
def _(w, b):
    return ["verify", str(_pkg(w, b))]


EXTERNAL_DATA = {  # the first external tensor's field set to a value, then the manifest rehashed
    "pointing outside the package": ("location", "../../etc/passwd", "not in a data file of the package"),
    "at an absolute path": ("location", "/etc/passwd", "not in a data file of the package"),
    "in the manifest itself": ("location", "manifest.json", "not in a data file of the package"),
    "past the end of its file": ("offset", str(1 << 40), "lies outside"),
    "of a negative length": ("length", "-8", "lies outside"),
    "of a length that is no number": ("length", "many", "offset/length"),
}
for _id, (_key, _value, _needle) in EXTERNAL_DATA.items():

    def _external(w, b, key=_key, value=_value):
        import onnx

        p = _pkg(w, b)
        model = onnx.load(str(p / "model.onnx"), load_external_data=False)
        t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        next(e for e in t.external_data if e.key == key).value = value
        onnx.save(model, str(p / "model.onnx"))
        _rehash(p)
        return ["verify", str(p)]

    refuse(f"verify: external data {_id}", _external, _needle)


@case("verify: a package file that is a symlink to an outside file", "not a regular file")
def _(w, b):
    p = _pkg(w, b)
    (w / "outside.md").write_text((p / "README.md").read_text())
    (p / "README.md").unlink()
    (p / "README.md").symlink_to(w / "outside.md")
    return ["verify", str(p)]


@case("verify: genai_config.json naming a native library", "genai_config.json")
def _(w, b):
    p = _pkg(w, b)
    g = json.loads((p / "genai_config.json").read_text())
    g["model"]["decoder"]["session_options"]["custom_ops_library"] = "/tmp/evil.so"
    (p / "genai_config.json").write_text(json.dumps(g))
    _rehash(p)
    return ["verify", str(p)]


@case("verify: genai_config.json with a provider added", "genai_config.json")
def _(w, b):
    p = _pkg(w, b)
    g = json.loads((p / "genai_config.json").read_text())
    g["model"]["decoder"]["session_options"]["provider_options"] = [{"cuda": {}}]
    (p / "genai_config.json").write_text(json.dumps(g))
    _rehash(p)
    return ["verify", str(p)]


@case("verify: genai_config.json eos out of the vocabulary", "eos_token_id")
def _(w, b):
    p = _pkg(w, b)
    g = json.loads((p / "genai_config.json").read_text())
    g["model"]["eos_token_id"] = [1 << 30]
    (p / "genai_config.json").write_text(json.dumps(g))
    _rehash(p)
    return ["verify", str(p)]


@case("verify: model.tflite cut in half and rehashed", "model.tflite")
def _(w, b):
    p = _pkg(w, b, "tflite")
    data = (p / "model.tflite").read_bytes()
    (p / "model.tflite").write_bytes(data[: len(data) // 2])
    _rehash(p)
    return ["verify", str(p)]


@case("verify: a native library listed in the manifest", "not a file a package has")
def _(w, b):
    p = _pkg(w, b)
    (p / "libevil.so").write_bytes(b"\x7fELF")
    _rehash(p)
    return ["verify", str(p)]


@case("verify: a file entry naming a parent path", "not a file a package has")
def _(w, b):
    p = _pkg(w, b)
    m = json.loads((p / "manifest.json").read_text())
    m["files"]["../escape"] = {"bytes": 1, "sha256": "0" * 64}
    (p / "manifest.json").write_text(json.dumps(m))
    return ["verify", str(p)]


@case("verify: a subdirectory in the package", "not in the manifest")
def _(w, b):
    p = _pkg(w, b)
    (p / "extra").mkdir()
    return ["verify", str(p)]


@case("verify: a FIFO in the package", "not in the manifest")
def _(w, b):
    p = _pkg(w, b)
    os.mkfifo(p / "pipe")
    return ["verify", str(p)]


@case("verify: a FIFO as manifest.json", "not a regular file")
def _(w, b):
    p = _pkg(w, b)
    (p / "manifest.json").unlink()
    os.mkfifo(p / "manifest.json")
    return ["verify", str(p)]


@case("verify: a 20 MB manifest", "bytes")
def _(w, b):
    p = _pkg(w, b)
    (p / "manifest.json").write_text('{"pad": "' + "x" * (20 << 20) + '"}')
    return ["verify", str(p)]


@case("verify: manifest a JSON array", "not a JSON object")
def _(w, b):
    p = _pkg(w, b)
    (p / "manifest.json").write_text("[]")
    return ["verify", str(p)]


@case("verify: manifest schema 99", "schema")
def _(w, b):
    p = _pkg(w, b)
    m = json.loads((p / "manifest.json").read_text())
    m["schema_version"] = 99
    (p / "manifest.json").write_text(json.dumps(m))
    return ["verify", str(p)]


@case("verify: a file modified without rehashing", "sha256")
def _(w, b):
    p = _pkg(w, b)
    with open(p / "tokenizer.json", "r+b") as f:
        f.seek(10)
        f.write(b"#")
    return ["verify", str(p)]


@case("verify: not a directory", "not a package directory")
def _(w, b):
    (w / "file").write_text("x")
    return ["verify", str(w / "file")]


for _field, (_fmt, _edit) in {
    "cache length": ("tflite", lambda m: m["target"].__setitem__("max_seq_len", 4096)),
    "cache length (ONNX)": ("onnx", lambda m: m["kv_cache"].__setitem__("max_seq_len", 32)),
    "vocabulary size": ("onnx", lambda m: m["architecture"].__setitem__("vocab_size", 256000)),
    "layer count": ("tflite", lambda m: m["architecture"].__setitem__("num_layers", 32)),
    "KV head count": ("onnx", lambda m: m["architecture"].__setitem__("num_kv_heads", 8)),
    "cache dtype": ("tflite", lambda m: m["kv_cache"].__setitem__("dtype", "float16")),
}.items():

    def _unsigned_edit(w, b, fmt=_fmt, edit=_edit):
        p = _pkg(w, b, fmt)
        (p / "manifest.json.sig").unlink()
        m = json.loads((p / "manifest.json").read_text())
        edit(m)
        (p / "manifest.json").write_text(json.dumps(m))
        return ["verify", str(p)]

    refuse(f"verify: unsigned manifest's {_field} edited", _unsigned_edit, "disagree with the model's I/O")


@case("verify: a manifest with a key given twice", "appears twice")
def _(w, b):
    p = _pkg(w, b)
    text = (p / "manifest.json").read_text()
    twice = text.replace('{\n  "architecture"', '{\n  "format": "tflite",\n  "architecture"', 1)
    assert twice != text
    (p / "manifest.json").write_text(twice)
    return ["verify", str(p)]


@case("config: a key given twice", "appears twice")
def _(w, b):
    m = _model(w, b)
    text = (m / "config.json").read_text()
    (m / "config.json").write_text(text.replace("{", '{"hidden_size": 32, ', 1))
    return _export(m, w)


@case("safetensors: a tensor named twice in the header", "appears twice")
def _(w, b):
    m = _model(w, b)
    data = (m / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].decode()
    first = header[1:].split("},", 1)[0] + "}"  # the first entry, "name":{...}
    raw = ("{" + first + "," + header[1:]).encode()
    raw += b" " * (-len(raw) % 8)
    (m / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return _export(m, w)


@case("gguf: a vocabulary too long to be a tokenizer's", "too long")
def _(w, b):
    tokens = ["x" * 1000 + str(i) for i in range(5000)]
    (w / "bad.gguf").write_bytes(_gguf(_LLAMA_KVS + [("tokenizer.ggml.tokens", 9, (8, tokens))], [], b""))
    return _export(w / "bad.gguf", w)


@case("eval: --text a FIFO", "not a regular file")
def _(w, b):
    os.mkfifo(w / "text.txt")
    return ["eval", str(b / "pkg-onnx"), "--text", str(w / "text.txt")]


@case("eval: --text not UTF-8", "UTF-8")
def _(w, b):
    (w / "text.txt").write_bytes(b"caf\xe9 " * 100)
    return ["eval", str(b / "pkg-onnx"), "--text", str(w / "text.txt")]


@case("bench: a suite that is a FIFO", "not a regular file")
def _(w, b):
    os.mkfifo(w / "suite.toml")
    return ["bench", "run", str(w / "suite.toml"), "--out", str(w / "out" / "r.json")]


@case("bench: a suite that is not TOML", "not a valid suite")
def _(w, b):
    (w / "suite.toml").write_text("[[case]\nmodel = ")
    return ["bench", "run", str(w / "suite.toml"), "--out", str(w / "out" / "r.json")]


@case("bench: results that are a FIFO", "not a regular file")
def _(w, b):
    os.mkfifo(w / "a.json")
    return ["bench", "compare", str(w / "a.json"), str(w / "a.json")]


@case("bench: results nested 100000 deep", "JSON")
def _(w, b):
    (w / "a.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["bench", "compare", str(w / "a.json"), str(w / "a.json")]


@case("device: an ssh host that is an option", "may not start with '-'")
def _(w, b):
    return ["bench", str(b / "pkg-onnx"), "--device", "ssh:-oProxyCommand=touch pwned"]


@case("device: an adb serial that is an option", "may not start with '-'")
def _(w, b):
    return ["bench", str(b / "pkg-onnx"), "--device", "adb:-d"]


# -- run: the prompt and the package
@case("run: an empty prompt", "empty")
def _(w, b):
    return ["run", str(b / "pkg-onnx"), "-p", ""]


@case("run: a prompt of spaces", "empty")
def _(w, b):
    return ["run", str(b / "pkg-onnx"), "-p", "   "]


@case("run: a prompt that is not UTF-8", "UTF-8")
def _(w, b):
    return ["run", str(b / "pkg-onnx"), "-p", os.fsdecode(b"caf\xe9")]


@case("run: a prompt longer than the cache", "KV cache holds")
def _(w, b):
    return ["run", str(b / "pkg-tflite"), "-p", " ".join(["the"] * 100)]


@case("run: generation stops where the cache ends", "the", ok=True)
def _(w, b):
    return ["run", str(b / "pkg-onnx"), "-p", " ".join(["the"] * 60), "-n", "50"]


@case("run: onnx package", "capital", ok=True)
def _(w, b):
    return ["run", str(b / "pkg-onnx"), "-p", "the capital is", "-n", "3", "--key", str(b / "key.pub")]


@case("run: tflite package", "capital", ok=True)
def _(w, b):
    return ["run", str(b / "pkg-tflite"), "-p", "the capital is", "-n", "3"]


@case("run: a package without a tokenizer", "no tokenizer.json")
def _(w, b):
    subprocess.run([*MOBILIZE, "export", str(b / "llama.gguf"), *EXPORT, "--out", str(w / "p")], check=True,
                   capture_output=True)  # fmt: skip
    return ["run", str(w / "p"), "-p", "hi"]


# -- what the target runtime needs, checked at export: a package that exports also runs
def _tiny(w: Path, **shape) -> Path:
    """A tiny llama of another shape, with a word-level tokenizer of its vocabulary and no special ids."""
    from helpers import write_tiny_hf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mobilize.frontend.families.common import tiny_config

    cfg = tiny_config("llama", **shape)
    m = write_tiny_hf(cfg, w / "m")
    words = {f"w{i}": i for i in range(min(cfg.vocab_size, 100))}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(m / "tokenizer.json"))
    for name in ("config.json", "generation_config.json"):
        d = json.loads((m / name).read_text())
        (m / name).write_text(json.dumps({k: v for k, v in d.items() if not k.endswith("token_id")}))
    return m


@case("runtime: head size 6 for ONNX Runtime's GroupQueryAttention", "multiple of 8")
def _(w, b):
    return _export(_tiny(w, head_dim=6), w)


def _export_then_run(w: Path, m: Path, *extra: str) -> list[str]:
    subprocess.run([*MOBILIZE, *_export(m, w, *extra)], check=True, capture_output=True)
    return ["run", str(w / "out"), "-p", "w1 w2", "-n", "3"]


@case("runtime: head size 6 with --opset std exports and runs", "w1 w2", ok=True)
def _(w, b):
    return _export_then_run(w, _tiny(w, head_dim=6), "--opset", "std")


@case("runtime: head size 6 as TFLite exports and runs", "w1 w2", ok=True)
def _(w, b):
    return _export_then_run(w, _tiny(w, head_dim=6), "--format", "tflite")


@case("runtime: a vocabulary of 4 tokens exports and runs", "w1 w2", ok=True)
def _(w, b):
    return _export_then_run(w, _tiny(w, vocab_size=4))


@case("runtime: one attention head of 64 exports and runs", "w1 w2", ok=True)
def _(w, b):
    return _export_then_run(w, _tiny(w, num_heads=1, num_kv_heads=1, head_dim=64), "--format", "tflite")


@case("runtime: a context of 8 positions exports and runs", "w1 w2", ok=True)
def _(w, b):
    m = _tiny(w, max_position_embeddings=8)
    subprocess.run([*MOBILIZE, "export", str(m), "-q", "int8", "--out", str(w / "out")], check=True,
                   capture_output=True)  # fmt: skip
    return ["run", str(w / "out"), "-p", "w1 w2", "-n", "3"]


@case("gguf: a Q8_0 block whose scale is NaN", "NaN")
def _(w, b):
    import gguf
    from helpers import write_tiny_gguf

    from mobilize.frontend.families.registry import FAMILIES

    path = write_tiny_gguf(FAMILIES["llama"].tiny(), b / "llama", w / "q8.gguf", {"ffn_up.weight": "Q8_0"})
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    start = int(t.data_offset) + 34 * 3  # the fourth block's float16 scale
    del reader
    data = bytearray(path.read_bytes())
    data[start : start + 2] = np.array([np.nan], np.float16).tobytes()
    path.write_bytes(bytes(data))
    return _export(path, w)


@case("export: random weights of a shape no machine holds", "GiB")
def _(w, b):
    m = _model(w, b, lambda c: c.update(hidden_size=1 << 17, vocab_size=1 << 23, head_dim=128))
    return ["export", str(m), "--random-weights", "--target", "host", "--out", str(w / "out")]


@case("export: --prefill-len given 17 times", "at most 16")
def _(w, b):
    return ["export", str(b / "llama"), "-f", "tflite", *[f"--prefill-len={n}" for n in range(1, 18)],
            "--out", str(w / "out")]  # fmt: skip


# -- optional parts that are missing: one line naming what to install
def _without(module: str, w: Path) -> dict:
    shadow = w / "shadow"
    shadow.mkdir(exist_ok=True)
    (shadow / f"{module}.py").write_text(f'raise ModuleNotFoundError("No module named {module}", name="{module}")\n')
    return os.environ | {"PYTHONPATH": str(shadow)}


@case("optional: --runtime genai without onnxruntime-genai", "mobilize[genai]")
def _(w, b):
    return ["bench", str(b / "pkg-onnx"), "--runtime", "genai", "--repeats", "1", "--gen-len", "2"]


@case("optional: eval --reference transformers without torch", "mobilize[reference]")
def _(w, b):
    return ["eval", str(b / "pkg-onnx"), "--reference", "transformers"]


@case("optional: bench plot without matplotlib", "mobilize[plot]")
def _(w, b):
    (w / "r.json").write_text(json.dumps({"results": []}))
    return ["bench", "plot", str(w / "r.json"), "--out", str(w / "plots")]


@case("optional: --sign without cryptography", "cryptography")
def _(w, b):
    return [*_export(b / "llama", w), "--sign", str(b / "key")]


_SHADOWED = {
    "optional: --runtime genai without onnxruntime-genai": "onnxruntime_genai",
    "optional: eval --reference transformers without torch": "torch",
    "optional: bench plot without matplotlib": "matplotlib",
    "optional: --sign without cryptography": "cryptography",
}


# ---- the runner -------------------------------------------------------------------------------------------------


def test_run_into_a_closed_pipe_is_quiet(base):
    """`mobilize run ... | head -c 1`: the reader leaves; no traceback, no error line."""
    p = subprocess.Popen([*MOBILIZE, "run", str(base / "pkg-onnx"), "-p", "the capital is", "-n", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=TIMEOUT_S)
    assert p.returncode in (0, 1, 141) and err == "", err  # (click exits 1 quietly on EPIPE)


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_corpus_has_every_class():
    assert len(CASES) >= 150, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)
    prefixes = {c.id.split(":")[0] for c in CASES}
    assert {"usage", "source", "leak", "config", "index", "tokenizer", "gguf", "install", "forgery", "signing",
            "verify", "run", "runtime", "optional", "safetensors", "eval", "bench", "device"} <= prefixes  # fmt: skip


def test_corpus(base: Path, tmp_path: Path):
    """Every case, two at a time (one per core: each is a process of its own); all failures reported together.
    MOBILIZE_CORPUS=text runs only the cases whose id holds it."""
    from concurrent.futures import ThreadPoolExecutor

    chosen = [c for c in CASES if os.environ.get("MOBILIZE_CORPUS", "") in c.id]
    base_before = _tree(base)

    def one(i_case):
        i, c = i_case
        try:
            _case(c, base, tmp_path / f"case-{i}")
        except Exception as e:  # (AssertionError, and a setup that failed)
            return f"{c.id}: {type(e).__name__}: {str(e)[:600]}"
        return None

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        failures = [f for f in pool.map(one, enumerate(chosen)) if f is not None]
    assert not failures, f"{len(failures)} of {len(chosen)} cases failed:\n" + "\n".join(failures)
    assert _tree(base) == base_before  # no case changed the shared inputs


def _case(c: Case, base: Path, root: Path) -> None:
    w = root / "w"
    w.mkdir(parents=True)
    args = c.setup(w, base)
    env = _without(_SHADOWED[c.id], w) if c.id in _SHADOWED else None
    before = _tree(w)
    r = _cli(*args, cwd=w, env=env)
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    if c.ok:
        assert r.returncode == 0, err
        assert c.needle in r.stdout.decode(errors="replace") + err, (r.stdout, err)
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("mobilize: error: "), err
        assert c.needle in lines[0], lines[0]
        assert len(lines[0]) <= 1100
    after = _tree(w)
    assert not [p for p in after if ".partial-" in p or ".old-" in p], after  # every partial swept

    def written(p: str) -> bool:  # where a case may write: its --out
        return p.split("/")[0] in ("out", "p")

    swept = "swept" in c.id or "put back" in c.id
    changed = {p for p in before if after.get(p) != before[p] and not written(p)}
    assert not {p for p in changed if not (swept and (".partial-" in p or ".old-" in p))}, changed
    added = {p for p in after if p not in before}
    assert all(written(p) for p in added), added
    if not c.ok and not swept:
        assert not {p for p in added | {q for q in before if after.get(q) != before[q]}}, "a refusal wrote something"
