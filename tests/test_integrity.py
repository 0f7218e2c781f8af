"""Packages are what their manifest says: byte-identical rebuilds, `verify` and `run` refusing a flipped
byte in any file, and exports that a SIGKILL cannot leave half-written under the package's name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def package(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "llama-int4"
    r = _cli("export", str(tiny_hf("llama")), "--out", str(out), "-q", "int4")
    assert r.returncode == 0, r.stderr
    return out


def test_rebuild_is_byte_identical(package, tiny_hf, tmp_path):
    again = tmp_path / "again"
    assert _cli("export", str(tiny_hf("llama")), "--out", str(again), "-q", "int4").returncode == 0
    names = sorted(p.name for p in package.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (package / name).read_bytes() == (again / name).read_bytes(), name


def test_verify_accepts_the_package(package):
    r = _cli("verify", str(package))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ") and "sha256" in r.stdout


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mobilize: error: ") and needle in lines[0], r.stderr


@pytest.mark.slow  # (over 5 s: out of the fast subset)
def test_a_flipped_byte_in_any_file_is_refused(package, tmp_path):
    for file in sorted(p.name for p in package.iterdir()):
        bad = tmp_path / file
        shutil.copytree(package, bad)
        if file == "manifest.json":  # inside a recorded sha256: the manifest disagrees with a file
            text = (bad / file).read_text()
            _flip(bad / file, text.index('"sha256": "') + 20)
        else:
            _flip(bad / file, (bad / file).stat().st_size // 2)
        needle = "sha256" if file != "manifest.json" else "does not match"
        _one_line_error(_cli("verify", str(bad)), needle)
        _one_line_error(_cli("run", str(bad), "--prompt", "x", "-n", "2"), needle)


def test_missing_and_unlisted_files_are_refused(package, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(package, missing)
    (missing / "genai_config.json").unlink()
    _one_line_error(_cli("verify", str(missing)), "genai_config.json is missing")
    extra = tmp_path / "extra"
    shutil.copytree(package, extra)
    (extra / "payload.so").write_bytes(b"\x7fELF")
    _one_line_error(_cli("verify", str(extra)), "'payload.so' is not in the manifest")
    _one_line_error(_cli("verify", str(tmp_path / "nowhere")), "not a package directory")


@pytest.mark.slow  # (over 5 s: out of the fast subset)
def test_sigkill_during_export_leaves_the_old_package(package, tmp_path):
    """Kill an fp32 export of the real-shaped Gemma 3 270M while it writes; the good package already at
    the destination stays whole, nothing half-written takes its name, and the next export sweeps the
    dead export's temporary directory."""
    dest = tmp_path / "pkg"
    shutil.copytree(package, dest)
    cmd = [sys.executable, "-m", "mobilize.cli", "export", "gemma3-270m", "--random-weights", "-q", "fp32"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(dest), "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    partial = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".pkg.partial-*") if (p / "model.onnx.data").exists()]
        if partial:
            break
        time.sleep(0.05)
    assert partial, "the export never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _cli("verify", str(dest)).returncode == 0  # the old package, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pkg.")] == [partial[0].name]
    # The next export (here of a small model) removes the dead export's directory.
    assert _cli("export", str(package.parent / "nothing"), "--out", str(dest)).returncode == 1
    assert not partial[0].exists()


@pytest.mark.slow  # (over 5 s: out of the fast subset)
def test_a_failed_write_leaves_the_old_package(package, tmp_path):
    """The writer fails part way (a file-size limit: the kernel refuses the write, as with a full disk):
    one error line, the old package whole, no temporary directory left."""
    import resource

    dest = tmp_path / "pkg"
    shutil.copytree(package, dest)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    cmd = [sys.executable, "-m", "mobilize.cli", "export", "gemma3-270m", "--random-weights", "-q", "fp32"]
    r = subprocess.run(
        [*cmd, "--out", str(dest), "--overwrite"], capture_output=True, text=True, timeout=300, preexec_fn=limit
    )
    _one_line_error(r, "could not write the package")
    assert "the disk is full or a file-size limit was reached" in r.stderr
    assert _cli("verify", str(dest)).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


@pytest.mark.slow
def test_gemma3_int4_rebuild_is_byte_identical(tmp_path):
    """The real model, the main job's recipe: two exports, the same bytes in every file."""
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        r = _cli("export", "gemma3-270m", "--target", "android", "--out", str(out))
        assert r.returncode == 0, r.stderr
    assert (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    # manifest.json lists every other file's sha256; verify checks the bytes against it
    assert _cli("verify", str(second)).returncode == 0


_FULL_DISK = """
set -u
mount -t tmpfs -o size=400k tmpfs "$DIR"
cp -r "$OLD" "$DIR/pkg"
"$PY" -m mobilize.cli export "$SRC" --format "$FMT" -q fp32 --max-seq-len 64 --out "$DIR/pkg" --overwrite \
    2> "$DIR.stderr"
echo "export rc=$?"
"$PY" -m mobilize.cli verify "$DIR/pkg" > /dev/null && echo "old package verifies"
ls -A "$DIR"
"""


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_a_full_filesystem_leaves_the_old_package(fmt, package, tiny_hf, tmp_path):
    """A real filesystem too small for the new package (a 400 KB tmpfs, mounted in a private mount
    namespace): one error line, the old package whole, no temporary directory left on it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {
        "DIR": str(mnt), "OLD": str(package), "PY": sys.executable, "SRC": str(tiny_hf("llama")), "FMT": fmt,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }  # fmt: skip
    r = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", _FULL_DISK],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == ["export rc=1", "old package verifies", "pkg"], r.stdout + r.stderr
    err = (tmp_path / "mnt.stderr").read_text()
    assert err.count("\n") == 1 and err.startswith("mobilize: error: could not write the package"), err
    assert "the disk is full" in err


@pytest.mark.slow
def test_sigint_during_export_leaves_the_old_package(package, tmp_path):
    """Ctrl-C while the model is written: one line, exit 130, the old package whole, nothing left over, not
    even in the cache, where the tokenizer was being converted in a child process (a fresh cache)."""
    from mobilize.frontend.sources.aliases import bundled_gguf

    dest, cache = tmp_path / "pkg", tmp_path / "cache"
    shutil.copytree(package, dest)
    cache.mkdir()
    (cache / bundled_gguf().name).symlink_to(bundled_gguf())
    cmd = [sys.executable, "-m", "mobilize.cli", "export", "gemma3-270m", "--random-weights", "-q", "fp32"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(dest), "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background runner may ignore it
        env={**os.environ, "MOBILIZE_CACHE": str(cache)},
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if [p for p in tmp_path.glob(".pkg.partial-*") if (p / "model.onnx.data").exists()]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.decode().strip().splitlines() if not line.startswith("mobilize:  ")]  # (progress)
    assert lines == ["mobilize: interrupted; nothing was left half-written"], err
    assert _cli("verify", str(dest)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pkg"]
    # the child converting the tokenizer either finished (a complete cache entry) or cleaned up after itself
    leftovers = [p.name for p in (cache / "tokenizers").glob("tokenizer-*")] if (cache / "tokenizers").exists() else []
    assert leftovers == []


@pytest.mark.slow
def test_gemma3_tflite_bundle_rebuilds_byte_identical_and_runs_in_litert_lm(tmp_path):
    """The real model as a TFLite package with its LiteRT-LM bundle, twice: the same bytes in every file
    (the bundle's uuid and time stamp included); LiteRT-LM's engine generates from the bundle the same
    greedy text our LiteRT runner does from model.tflite."""
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        r = _cli("export", "gemma3-270m", "--format", "tflite", "--bundle", "litertlm", "--max-seq-len", "256",
                 "--out", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in first.iterdir())
    assert {"model.tflite", "model.litertlm", "tokenizer.json"} <= set(names)
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    import litert_lm

    from mobilize.harness.package import Package
    from mobilize.harness.runner import greedy

    pkg = Package.open(first)
    tok = pkg.tokenizer()
    prompt = "The river runs through the old town and"
    ids = tok.encode(prompt).ids
    ids = ids if ids[:1] == [2] else [2, *ids]  # one BOS, as the engine adds it
    ours = greedy(pkg.runner(2), ids, 16)
    engine = litert_lm.Engine(
        str(first / "model.litertlm"), backend=litert_lm.Backend.CPU(thread_count=2), cache_dir=str(tmp_path),
        activation_data_type=litert_lm.ActivationDataType.FLOAT32,
    )  # fmt: skip
    # top_p 0 leaves the most likely token only (the CPU engine implements no greedy sampler type)
    greedy_sampler = litert_lm.SamplerConfig(top_k=1, top_p=0.0, temperature=1.0, seed=0)
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=16, sampler_config=greedy_sampler)
    session.run_prefill([prompt])
    text = session.run_decode().texts[0]
    theirs = tok.encode(text, add_special_tokens=False).ids
    # The same model in both: the engine's first tokens are ours, and every token it picks has, fed back
    # through our runner, a logit within 1.5 of our largest. (XNNPACK quantizes activations to int8 at run
    # time and the two runtimes set it up differently: here their logits part by up to ~1.0, so a near tie may
    # break the other way and the texts part after it.)
    assert len(theirs) >= 8 and theirs[:4] == ours[:4], (text, tok.decode(ours))
    runner = pkg.runner(2)
    logits = np.atleast_2d(runner.prefill(ids))[-1]
    for t in theirs:
        assert logits.max() - logits[t] <= 1.5, (text, tok.decode(ours), tok.decode([t]))
        logits = runner.decode(t).reshape(-1)
    r = _cli("bench", str(first), "--runtime", "litert-lm", "--repeats", "1", "--prompt-len", "32", "--gen-len", "8",
             "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["runtime"] == "litert-lm" and [x["test"] for x in result["records"]] == ["pp32", "tg8"]
    assert all(x["avg_ts"] > 0 for x in result["records"])
    assert sorted(p.name for p in first.iterdir()) == names  # the engine's weight cache is kept elsewhere
    assert _cli("verify", str(first)).returncode == 0
