"""On-device benchmarks: `mobilize bench PACKAGE --device ssh:HOST` against a real OpenSSH server the
test starts on loopback (keys made here), `--device local`, and `--device adb:SERIAL` through a stand-in
`adb` (no phone here) that records the commands and plays the device on a local directory."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilize.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def package(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dev") / "pkg"
    r = _cli("export", str(tiny_hf("llama")), "--format", "tflite", "-q", "int8", "--max-seq-len", "64",
             "--prefill-len", "8", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ssh_config(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1 (this user, key login only) and a client config naming it."""
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None  # privilege separation dir
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    config = d / "ssh_config"
    user = pwd.getpwuid(os.geteuid()).pw_name
    config.write_text(
        f"Host mobilize-loopback\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {d / 'client_key'}\n  StrictHostKeyChecking no\n  UserKnownHostsFile {d / 'known_hosts'}\n"
    )
    yield config
    server.terminate()
    server.wait(timeout=10)


def _records(result: dict) -> list[str]:
    assert all(r["avg_ts"] > 0 for r in result["records"])
    return [r["test"] for r in result["records"]]


def test_bench_over_ssh(package, ssh_config, tmp_path):
    env = {**os.environ, "MOBILIZE_SSH_CONFIG": str(ssh_config)}
    remote = tmp_path / "remote"
    r = _cli("bench", str(package), "--device", "ssh:mobilize-loopback", "--remote-python", sys.executable,
             "--remote-dir", str(remote), "--prompt-len", "8", "--gen-len", "4", "--repeats", "2", "--json",
             env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert _records(result) == ["pp8", "tg4"] and len(result["records"][0]["samples_ts"]) == 2
    assert result["device"]["spec"] == "ssh:mobilize-loopback" and result["device"]["cpus"] >= 1
    # what went over: the package, byte for byte, and the runtime zip (nothing of mobilize installed is used)
    assert sorted(p.name for p in remote.iterdir()) == ["mobilize-runtime.zip", "package"]
    for f in package.iterdir():
        assert (remote / "package" / f.name).read_bytes() == f.read_bytes()


def test_a_failure_on_the_device_is_one_line(package, ssh_config, tmp_path):
    """The device's own error (here: no such Python there) comes back as one line, exit 1."""
    env = {**os.environ, "MOBILIZE_SSH_CONFIG": str(ssh_config)}
    r = _cli("bench", str(package), "--device", "ssh:mobilize-loopback", "--remote-python", "/nonexistent/python3",
             "--remote-dir", str(tmp_path / "remote"), env=env)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("mobilize: error: bench failed on ssh:mobilize-loopback: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bench_on_local_device_onnx(tiny_hf, tmp_path):
    out = tmp_path / "onnx"
    assert _cli("export", str(tiny_hf("llama")), "-q", "int4", "--max-seq-len", "64", "--out", str(out)).returncode == 0
    r = _cli("bench", str(out), "--device", "local", "--remote-python", sys.executable, "--prompt-len", "8",
             "--gen-len", "4", "--repeats", "1", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _records(json.loads(r.stdout)) == ["pp8", "tg4"]


FAKE_ADB = """#!/bin/sh
# A stand-in for adb: logs each call, and plays the device on $FAKE_DEVICE (paths under / map into it).
echo "$@" >> "$FAKE_ADB_LOG"
[ "$1" = "-s" ] || exit 2
serial=$2; shift 2
[ "$serial" = "emulator-5554" ] || { echo "error: device '$serial' not found" >&2; exit 1; }
case "$1" in
  push) mkdir -p "$FAKE_DEVICE$(dirname "$3")"; cp -r "$2" "$FAKE_DEVICE$3" ;;
  shell) shift; cmd=$(printf '%s' "$*" | sed "s#/data/#$FAKE_DEVICE/data/#g"); sh -c "$cmd" ;;
  *) exit 2 ;;
esac
"""


def test_bench_over_adb_with_a_stand_in(package, tmp_path):
    bin_dir, device, log = tmp_path / "bin", tmp_path / "phone", tmp_path / "adb.log"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB)
    (bin_dir / "adb").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DEVICE": str(device),
        "FAKE_ADB_LOG": str(log),
    }
    r = _cli("bench", str(package), "--device", "adb:emulator-5554", "--remote-python", sys.executable,
             "--prompt-len", "8", "--gen-len", "4", "--repeats", "1", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _records(json.loads(r.stdout)) == ["pp8", "tg4"]
    calls = log.read_text().splitlines()
    assert calls[0] == ("-s emulator-5554 shell mkdir -p /data/local/tmp/mobilize-bench && df -k "
                        "/data/local/tmp/mobilize-bench")  # room for the package, checked before anything is pushed
    # pushed into a staging folder, then renamed into place whole
    pushes = [c for c in calls if c.startswith("-s emulator-5554 push ")]
    assert any(c.endswith(f"/data/local/tmp/mobilize-bench/.mobilize-push/{package.name}") for c in pushes), pushes
    assert any(f"mv /data/local/tmp/mobilize-bench/.mobilize-push/{package.name} /data/local/tmp/mobilize-bench/package"
               in c for c in calls)  # fmt: skip
    assert "mobilize.harness.remote bench package --threads 2" in calls[-1]
    r = _cli("bench", str(package), "--device", "adb:0123", "--remote-python", sys.executable, env=env)
    assert r.returncode == 1 and "cannot reach adb:0123: error: device '0123' not found" in r.stderr


def test_device_spec_errors(package):
    r = _cli("bench", str(package), "--device", "usb:1")
    assert r.returncode == 1 and r.stderr.strip() == (
        "mobilize: error: --device 'usb:1': expected local, ssh:HOST or adb:SERIAL"
    )


def test_the_runtime_zip_verifies_both_formats_by_itself(tiny_hf, tmp_path):
    """What is pushed to a device imports from the zip alone: the package reader, verify (with the TFLite
    signature reader it needs), the runners, and it verifies a TFLite package there."""
    from mobilize.harness.device import ZIP_NAME, runtime_zip

    (tmp_path / ZIP_NAME).write_bytes(runtime_zip())
    out = tmp_path / "pkg"
    r = subprocess.run(
        [sys.executable, "-m", "mobilize.cli", "export", str(tiny_hf("llama")), "--out", str(out), "--format",
         "tflite", "--max-seq-len", "32"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    code = (
        "import sys, mobilize; from mobilize.package.verify import verify_package; "
        "from mobilize.harness import package, remote; "
        f"assert mobilize.__file__.startswith({str(tmp_path / ZIP_NAME)!r}), mobilize.__file__; "
        f"verify_package({str(out)!r}); print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / ZIP_NAME)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.slow  # (the fast subset keeps under 3 minutes; CI runs it)
def test_run_and_eval_on_a_device_give_what_they_give_here(tiny_hf, tmp_path):
    """`run --device` and `eval --device` (here `local`: the same runtime as this machine's) print what the same
    commands print without it: tokens computed there, decoded here; the text scored there, the figures here."""
    from helpers import with_word_tokenizer

    src = with_word_tokenizer(tiny_hf("llama"), tmp_path / "src", tmp_path / "text.txt", 200)
    out = tmp_path / "pkg"
    assert _cli("export", str(src), "-q", "int8", "--max-seq-len", "128", "--out", str(out)).returncode == 0
    device = ["--device", "local", "--remote-python", sys.executable]
    here, there = _cli("run", str(out), "-p", "w1 w2 w3", "-n", "12"), _cli("run", str(out), "-p", "w1 w2 w3", "-n",
                                                                          "12", *device)  # fmt: skip
    assert here.returncode == there.returncode == 0, there.stderr
    assert there.stdout == here.stdout and len(here.stdout.split()) == 15
    assert "on local:" in there.stderr and "emulated" not in there.stderr
    text = ["--text", str(tmp_path / "text.txt"), "--chunk", "64", "--json"]
    a, b = json.loads(_cli("eval", str(out), *text).stdout), json.loads(_cli("eval", str(out), *text, *device).stdout)
    assert a["tokens"] == b["tokens"] == 199 and a["greedy_match"] == b["greedy_match"]
    assert abs(a["perplexity"] - b["perplexity"]) < 1e-6 * a["perplexity"]
    assert a["top1_agreement"] == b["top1_agreement"]
    assert abs(a["mean_kl"] - b["mean_kl"]) < 1e-6  # a vocabulary of 128: the device's KL is over all of it
    assert b["device"]["spec"] == "local" and b["device"]["emulated"] is None


def test_an_emulated_device_says_so(tmp_path):
    from mobilize.harness.remote import emulation

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    none = str(tmp_path / "no-marker")
    assert emulation(none, str(x86), "aarch64") == "qemu-user: a aarch64 userland on an x86 CPU"
    assert emulation(none, str(arm), "aarch64") is None  # a phone, a board
    assert emulation(none, str(x86), "x86_64") is None  # this machine
    marker = tmp_path / "marker"
    marker.write_text("qemu 7.2 (-cpu cortex-a76) on x86_64\n")
    assert emulation(str(marker), str(arm), "aarch64") == "qemu 7.2 (-cpu cortex-a76) on x86_64"


def test_results_from_an_emulated_device_are_never_compared(tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"results": [{"id": "a", "metrics": {"decode_tok_s": 5.0},
                                                "device": {"emulated": "qemu-user"}}]}))  # fmt: skip
    r = _cli("bench", "compare", str(results), str(results))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "results from an emulated device (qemu-user): they are never compared" in r.stderr


STAND_IN_BENCHMARK_MODEL = """#!/bin/sh
# A stand-in for LiteRT's benchmark_model (none on this machine): logs its arguments, prints what the real tool
# prints (the lines of tflite/tools/benchmark/benchmark_tflite_model.cc): 100 ms a prefill call, 20 ms a decode step
echo "$@" >> {log}
case "$*" in *signature_to_run_for=decode*) avg=20000 ;; *) avg=100000 ;; esac
echo "INFO: Initialized TensorFlow Lite runtime."
echo "INFO: count=3 first=$avg curr=$avg min=$avg max=$avg avg=$avg std=0"
echo "INFO: Inference timings in us: Init: 5000, First inference: $avg, Warmup (avg): $avg, Inference (avg): $avg"
echo "INFO: Overall peak memory footprint (MB) via periodic monitoring: 321.5"
"""

STAND_IN_LITERT_LM_MAIN = """#!/bin/sh
# A stand-in for LiteRT-LM's litert_lm_main --benchmark: its BenchmarkInfo block (runtime/engine/io_types.cc), on stderr
echo "$@" >> {log}
cat >&2 <<'END'
I1205 12:00:00.000000  1234 litert_lm_lib.cc:100] BenchmarkInfo:
  Init Phases (1):
    - Init Executor: 812.40 ms
--------------------------------------------------
  Time to first token: 0.45 s
  Prefill Turns (Total 1 turns):
    Prefill Turn 1: Processed 16 tokens in 400ms duration.
      Prefill Speed: 40.00 tokens/sec.
  Decode Turns (Total 1 turns):
    Decode Turn 1: Processed 4 tokens in 200ms duration.
      Decode Speed: 20.00 tokens/sec.
Peak system ram usage: 512.0MB.
END
"""


def test_a_runtimes_own_benchmark_binary_on_a_device(tiny_hf, tmp_path):
    """`bench --device --native PATH` pushes the binary beside the package, runs it there with the package's model
    file (no Python needed there) and reads what it prints into the bench JSON; stand-ins play the binaries."""
    from helpers import assert_one_line_error, with_word_tokenizer

    src = with_word_tokenizer(tiny_hf("llama"), tmp_path / "src", tmp_path / "text.txt", 10)
    pkg = tmp_path / "pkg"
    r = _cli("export", str(src), "-f", "tflite", "--max-seq-len", "64", "--prefill-len", "8", "--bundle", "litertlm",
             "--out", str(pkg))  # fmt: skip
    assert r.returncode == 0, r.stderr
    log = tmp_path / "calls.log"
    for name, text in (("benchmark_model", STAND_IN_BENCHMARK_MODEL), ("litert_lm_main", STAND_IN_LITERT_LM_MAIN)):
        (tmp_path / name).write_text(text.format(log=log))
    args = ["--device", "local", "--prompt-len", "16", "--gen-len", "4", "--repeats", "2", "--json", "--threads", "2"]
    r = _cli("bench", str(pkg), "--native", str(tmp_path / "benchmark_model"), *args)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    rates = {rec["test"]: rec["avg_ts"] for rec in result["records"]}
    # a 16-token prompt is two calls of prefill_8 at 100 ms; a decode step 20 ms
    assert rates == {"pp16": pytest.approx(80.0), "tg4": pytest.approx(50.0)}
    assert result["time_to_first_token_s"] == pytest.approx(0.22) and result["peak_rss_bytes"] == int(321.5 * 2**20)
    assert result["native"]["tool"] == "benchmark_model" and result["device"]["machine"]
    calls = log.read_text().splitlines()
    assert len(calls) == 6  # (warm-up + 2 runs) x (prefill, decode)
    assert calls[0].split() == ["--graph=package/model.tflite", "--num_threads=2", "--warmup_runs=1",
                                "--report_peak_memory_footprint=true", "--signature_to_run_for=prefill_8",
                                "--num_runs=2"]  # fmt: skip
    assert "--signature_to_run_for=decode" in calls[1] and "--num_runs=4" in calls[1]
    log.unlink()
    r = _cli("bench", str(pkg), "--native", str(tmp_path / "litert_lm_main"), *args)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {rec["test"]: rec["avg_ts"] for rec in result["records"]} == {"pp16": 40.0, "tg4": 20.0}
    assert result["time_to_first_token_s"] == 0.45 and result["peak_rss_bytes"] == 512 * 2**20
    assert "--model_path=package/model.litertlm" in log.read_text() and "--benchmark_decode_tokens=4" in log.read_text()
    # what goes wrong is one line
    other = tmp_path / "onnxruntime_perf_test"
    other.write_text("#!/bin/sh\n")
    assert_one_line_error(_cli("bench", str(pkg), "--native", str(other), *args), "not a benchmark tool mobilize knows",
                          "benchmark_model, litert_lm_main")  # fmt: skip
    (tmp_path / "benchmark_model").write_text("#!/bin/sh\necho 'ERROR: Failed to allocate tensors' >&2\nexit 1\n")
    assert_one_line_error(_cli("bench", str(pkg), "--native", str(tmp_path / "benchmark_model"), *args),
                          "benchmark_model failed on local: ERROR: Failed to allocate tensors")  # fmt: skip
    assert_one_line_error(_cli("bench", str(pkg), "--native", str(tmp_path / "litert_lm_main")),
                          "--native runs a benchmark binary on a --device")  # fmt: skip


@pytest.mark.slow  # (the fast subset keeps under 3 minutes; CI runs it)
def test_a_package_on_the_device_is_not_pushed_again_unless_changed(package, ssh_config, tmp_path):
    """The device holds the package from an earlier run: not copied again (its manifest's sha256 says so); a file
    changed there since is caught by the device's own check and the package pushed anew, whole."""
    env = {**os.environ, "MOBILIZE_SSH_CONFIG": str(ssh_config)}
    remote = tmp_path / "remote"
    args = ["bench", str(package), "--device", "ssh:mobilize-loopback", "--remote-python", sys.executable,
            "--remote-dir", str(remote), "--prompt-len", "8", "--gen-len", "2", "--repeats", "1", "--json"]  # fmt: skip
    assert _cli(*args, env=env).returncode == 0
    model = remote / "package" / "model.tflite"
    first = model.stat().st_ino
    assert _cli(*args, env=env).returncode == 0
    assert model.stat().st_ino == first  # the same file: not pushed again
    with open(model, "r+b") as f:  # changed on the device since
        f.seek(100)
        f.write(b"\xff")
    r = _cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert model.read_bytes() == (package / "model.tflite").read_bytes()  # pushed anew
    assert not (remote / ".mobilize-push").exists()
