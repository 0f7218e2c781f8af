"""Run a package on another machine: `mobilize bench|run|eval PACKAGE --device adb:SERIAL|ssh:HOST|local`.

The package and a zip of mobilize's runtime (harness/remote.py lists it) are pushed to a working directory
there (after checking it has room), `harness/remote.py` verifies the package's bytes and measures it, runs it
greedily or scores token ids with it, with the same code the host uses, and its JSON comes back (the device's
stdout), with the device described in it (an emulated one says so: harness/remote.py's `emulation`).

- `ssh:HOST`: OpenSSH (`ssh`, with `-F $MOBILIZE_SSH_CONFIG` when that is set; keys, ports and users come
  from the ssh config as usual); files go through `tar` on both ends. Linux boards, Termux on a phone.
- `adb:SERIAL`: `adb -s SERIAL push` and `adb -s SERIAL shell`; the phone needs a Python 3 with numpy
  and the package's runtime, which `adb shell` does not have: Termux's Python (its `pkg install python`, then
  `pip install numpy onnxruntime` or `ai-edge-litert`) with `--remote-python` naming it, or a board's.
- `local`: this machine, in a temporary directory: the same path end to end without a device.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.harness.remote import EMULATION_MARKER, RUNTIME_MODULES, VERIFY_FAILED
from mobilize.manifest import MANIFEST, Manifest
from mobilize.safe_io import quoted, sha256_file

ZIP_NAME = "mobilize-runtime.zip"


def runtime_zip() -> bytes:
    """mobilize's runtime modules as an importable zip (fixed timestamps: the same bytes every time)."""
    import mobilize
    from mobilize.targets.registry import TARGETS, runtime

    root = Path(mobilize.__file__).parent
    modules = list(RUNTIME_MODULES)
    for fmt in TARGETS:  # each target's package side, and what its runtimes import
        folder = TARGETS[fmt].removeprefix("mobilize.").replace(".", "/")
        modules += [f"{folder}/__init__.py", f"{folder}/runtime.py", *runtime(fmt).DEVICE_MODULES]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in modules:
            z.writestr(zipfile.ZipInfo(f"mobilize/{name}", (1980, 1, 1, 0, 0, 0)), (root / name).read_bytes())
    return buf.getvalue()


class Device:
    """A place to push files to and run shell commands in (its working directory)."""

    spec: str
    workdir: str

    def run(self, command: str, timeout: int) -> subprocess.CompletedProcess:
        try:
            return self._run(command, timeout)
        except subprocess.TimeoutExpired:
            raise MobilizeError(f"{self.spec} did not finish a command within {timeout} s") from None

    def push(self, local: Path, name: str) -> None:
        """`local` (a file or a directory) as `name` in the working directory, whole or not at all: copied into a
        staging folder there first, then renamed over whatever `name` was (an interrupted copy leaves no half)."""
        q = shlex.quote
        stage = f"{self.workdir}/.mobilize-push"
        self.run(f"rm -rf {q(stage)} && mkdir -p {q(stage)}", 600)
        try:
            self._copy(local, stage)
        except subprocess.TimeoutExpired:
            raise MobilizeError(f"copying {local.name} to {self.spec} took over an hour") from None
        dest = f"{self.workdir}/{name}"
        done = self.run(f"rm -rf {q(dest)} && mv {q(stage + '/' + local.name)} {q(dest)} && rm -rf {q(stage)}", 600)
        if done.returncode:
            raise MobilizeError(f"could not copy {local.name} to {self.spec}: {_last_line(done.stderr)}")

    def _run(self, command: str, timeout: int) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def _copy(self, local: Path, stage: str) -> None:
        """`local` into the folder `stage` there, under its own name."""
        raise NotImplementedError


class LocalDevice(Device):
    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mobilize-device-")
        self.spec, self.workdir = "local", self._tmp.name

    def _run(self, command, timeout):
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)

    def _copy(self, local, stage):
        (shutil.copytree if local.is_dir() else shutil.copyfile)(local, Path(stage) / local.name)


class SshDevice(Device):
    def __init__(self, host: str, workdir: str) -> None:
        self.host, self.workdir, self.spec = host, workdir, f"ssh:{host}"
        config = os.environ.get("MOBILIZE_SSH_CONFIG")
        self.ssh = ["ssh", *(["-F", config] if config else []), "-o", "BatchMode=yes", host]

    def _run(self, command, timeout):
        return subprocess.run([*self.ssh, command], capture_output=True, text=True, timeout=timeout)

    def _copy(self, local, stage):
        tar = subprocess.Popen(["tar", "-C", str(local.parent), "-cf", "-", "--", local.name], stdout=subprocess.PIPE)
        try:
            done = subprocess.run([*self.ssh, f"tar -C {shlex.quote(stage)} -xf -"], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=3600)  # fmt: skip
        finally:
            tar.stdout.close()
            try:
                tar.wait(timeout=60)
            except subprocess.TimeoutExpired:
                tar.kill()
                tar.wait()
        if done.returncode or tar.returncode:
            raise MobilizeError(f"could not copy {local.name} to {self.host}: {_last_line(done.stderr)}")


class AdbDevice(Device):
    def __init__(self, serial: str, workdir: str) -> None:
        self.adb, self.workdir = ["adb", "-s", serial], workdir
        self.serial, self.spec = serial, f"adb:{serial}"

    def _run(self, command, timeout):
        return subprocess.run([*self.adb, "shell", command], capture_output=True, text=True, timeout=timeout)

    def _copy(self, local, stage):
        done = subprocess.run([*self.adb, "push", str(local), f"{stage}/{local.name}"], capture_output=True,
                              text=True, timeout=3600)  # fmt: skip
        if done.returncode:
            raise MobilizeError(f"adb push to {self.serial} failed: {_last_line(done.stderr or done.stdout)}")


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def open_device(spec: str, workdir: str | None = None) -> Device:
    kind, _, target = spec.partition(":")
    if target.startswith("-") or any(not c.isprintable() or c.isspace() for c in target):
        # ssh and adb would take "-oProxyCommand=..." as an option: a command run on this machine
        raise MobilizeError(f"--device {spec[:80]!r}: a host or serial may not start with '-' or hold spaces")
    if kind == "local" and not target:
        return LocalDevice()
    if kind == "ssh" and target:
        if shutil.which("ssh") is None:
            raise MobilizeError("--device ssh: needs the OpenSSH client (ssh) on this machine")
        return SshDevice(target, workdir or "/tmp/mobilize-bench")
    if kind == "adb" and target:
        if shutil.which("adb") is None:
            raise MobilizeError("--device adb: needs Android's adb on this machine (platform-tools)")
        return AdbDevice(target, workdir or "/data/local/tmp/mobilize-bench")
    raise MobilizeError(f"--device {spec!r}: expected local, ssh:HOST or adb:SERIAL")


def free_kib(device: Device) -> int | None:
    """KiB free where the device's working directory is (None: `df` gave nothing this can read)."""
    q = shlex.quote(device.workdir)
    done = device.run(f"mkdir -p {q} && df -k {q}", timeout=60)
    rows = [line.split() for line in done.stdout.splitlines()[1:] if line.strip()]
    try:
        return int(rows[-1][3]) if not done.returncode else None
    except (IndexError, ValueError):
        return None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _push_package(device: Device, spec: str, package: Path, extra: int) -> bool:
    """The package in the device's working directory as `package/`, after checking there is room for it and `extra`
    bytes more; not pushed again where the device holds it already (its manifest's sha256 is this one's: whether
    every file still is, the device checks). Returns whether it was there already."""
    q = shlex.quote
    free = free_kib(device)
    there = device.run(f"sha256sum {q(device.workdir + '/package/' + MANIFEST)}", timeout=60).stdout.split()
    held = bool(there) and there[0] == sha256_file(package / MANIFEST)
    need = extra + (0 if held else _size(package))
    if free is None:
        probe = device.run("true", timeout=60)
        if probe.returncode:
            raise MobilizeError(f"cannot reach {spec}: {_last_line(probe.stderr or probe.stdout)}")
    elif free * 1024 < need + (16 << 20):
        raise MobilizeError(f"the package needs {need / 1e6:,.1f} MB on {spec}; {device.workdir} there has "
                            f"{free * 1024 / 1e6:,.1f} MB free (free some, or pass --remote-dir)")  # fmt: skip
    if not held:
        device.push(package.resolve(), "package")
    return held


def on_device(package: Path, spec: str, python: str, command: str, options: list[str],
              inputs: dict[str, np.ndarray] | None = None, workdir: str | None = None) -> dict:  # fmt: skip
    """Push the runtime zip, the package (unless the device holds it already) and `inputs` (an .npz), run
    `harness/remote.py COMMAND` there and return its JSON (with `device`: what ran it, `spec` included). The device
    checks every file of the package first. Every failure is one MobilizeError line."""
    device = open_device(spec, workdir)
    q = shlex.quote
    zipped = runtime_zip()
    held = _push_package(device, spec, package, len(zipped))
    device.run(f"rm -f {q(device.workdir + '/inputs.npz')}", timeout=60)
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / ZIP_NAME
        payload.write_bytes(zipped)
        device.push(payload, ZIP_NAME)
        if inputs is not None:
            np.savez(Path(tmp) / "inputs.npz", **inputs)
            device.push(Path(tmp) / "inputs.npz", "inputs.npz")
            options = [*options, "--inputs", "inputs.npz"]
    line = (f"cd {q(device.workdir)} && PYTHONPATH={ZIP_NAME} {q(python)} -m mobilize.harness.remote {command} "
            f"package {' '.join(q(o) for o in options)}")  # fmt: skip
    done = device.run(line, timeout=3600)
    if done.returncode == VERIFY_FAILED and held:  # a file there changed since it was pushed: pushed anew
        device.push(package.resolve(), "package")
        done = device.run(line, timeout=3600)
    if done.returncode:
        raise MobilizeError(f"{command} failed on {spec}: {_last_line(done.stderr or done.stdout)}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise MobilizeError(f"{spec} printed no result: {_last_line(done.stdout)}") from None
    result["device"] = {"spec": spec, **result.get("device", {})}
    return result


def native_on_device(package: Path, spec: str, binary: Path, threads: int, prompt_len: int, gen_len: int,
                     repeats: int, workdir: str | None = None) -> dict:  # fmt: skip
    """A runtime's own benchmark binary (`binary`, built for the device) run there on the package's model file,
    `repeats` times after a warm-up, its printed timings read into the host bench's JSON: a device that has no
    Python (a phone over adb) measured all the same. The binaries each target knows: its runtime's native_tools."""
    from mobilize.harness.perf import summarize
    from mobilize.targets.registry import runtime

    manifest = Manifest.read(package)
    tools = runtime(manifest.format).native_tools()
    name = next((n for n in tools if binary.name.startswith(n)), None)
    if name is None:
        known = ", ".join(tools) or "none"
        raise MobilizeError(f"--native {quoted(binary.name)}: not a benchmark tool mobilize knows for "
                            f"{manifest.format} packages (known: {known}; the file's name says which)")  # fmt: skip
    if not binary.is_file():
        raise MobilizeError(f"--native {quoted(binary)} is not a file")
    tool = tools[name]
    if tool.model_file not in manifest.files:
        raise MobilizeError(f"{name} runs the package's {tool.model_file}, which it does not have ({tool.missing})")
    device = open_device(spec, workdir)
    q = shlex.quote
    _push_package(device, spec, package, binary.stat().st_size)
    model = f"{device.workdir}/package/{tool.model_file}"
    for attempt in (0, 1):  # no Python there to verify with: the model file's sha256, the one file the tool reads
        found = device.run(f"sha256sum {q(model)}", timeout=600).stdout.split()
        if found[:1] == [manifest.files[tool.model_file].sha256]:
            break
        if attempt:
            raise MobilizeError(f"{spec}: package/{tool.model_file} there is not the package's (sha256), even pushed "
                                "again")  # fmt: skip
        device.push(package.resolve(), "package")
    device.push(binary.resolve(), name)
    device.run(f"chmod +x {q(device.workdir + '/' + name)}", timeout=60)
    runs = []
    for i in range(repeats + 1):  # the first: a warm-up
        outputs = []
        for args in tool.commands(manifest, threads, prompt_len, gen_len):
            done = device.run(f"cd {q(device.workdir)} && ./{name} {' '.join(q(a) for a in args)}", timeout=3600)
            if done.returncode:
                raise MobilizeError(f"{name} failed on {spec}: {_last_line(done.stderr or done.stdout)}")
            outputs.append(done.stdout + "\n" + done.stderr)
        if i:
            runs.append(tool.timing(outputs, manifest, prompt_len, gen_len))
    result = summarize(prompt_len, gen_len, [r.ttft_s for r in runs], [r.prefill_s for r in runs],
                       [r.decode_s for r in runs])  # fmt: skip
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    result["peak_rss_bytes"] = max(peaks) if peaks else None  # the tool's, where it said (not this process's)
    result["native"] = {"tool": name, "how": tool.note}
    result["device"] = {"spec": spec, **_describe(device)}
    return result


def _describe(device: Device) -> dict:
    """What the device is, asked of its shell (no Python there): harness/remote.py's device_info, as far as a shell
    can tell."""
    asks = ['machine=$(uname -m)', 'system=$(uname -sr)', 'cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null)',
            f'marker=$(cat {EMULATION_MARKER} 2>/dev/null)', "x86=$(grep -cE '^(vendor_id|flags)' /proc/cpuinfo)"]
    done = device.run("; ".join(f'echo "{a}"' for a in asks), timeout=60)
    said = dict(line.partition("=")[::2] for line in done.stdout.splitlines() if "=" in line)
    machine, x86 = said.get("machine", "").strip(), said.get("x86", "").strip()
    emulated = said.get("marker", "").strip() or (f"qemu-user: a {machine} userland on an x86 CPU"
                                                  if machine.startswith(("aarch64", "arm")) and x86 not in ("", "0")
                                                  else None)  # fmt: skip
    cpus = said.get("cpus", "").strip()
    return {"machine": machine, "system": said.get("system", "").strip(), "cpus": int(cpus) if cpus.isdigit() else None,
            "python": None, "emulated": emulated}  # fmt: skip


def array(field: dict) -> np.ndarray:
    """An array the device sent (harness/remote.py's `_array`)."""
    return np.frombuffer(base64.b64decode(field["data"]), dtype=np.dtype(field["dtype"])).reshape(field["shape"])


def bench_on_device(package: Path, spec: str, python: str, threads: int, prompt_len: int, gen_len: int,
                    repeats: int, workdir: str | None = None, runtime: str | None = None) -> dict:  # fmt: skip
    """Measure there; the host bench's JSON, with `device`."""
    options = ["--threads", str(threads), "--prompt-len", str(prompt_len), "--gen-len", str(gen_len),
               "--repeats", str(repeats), *(["--runtime", runtime] if runtime else [])]  # fmt: skip
    return on_device(package, spec, python, "bench", options, workdir=workdir)


def _prompts(prompts: list[list[int]], new_tokens: int, eos: set[int]) -> dict[str, np.ndarray]:
    ids, bounds = _pieces(prompts)
    return {"prompt_ids": ids, "prompt_bounds": bounds, "new_tokens": np.int64(new_tokens),
            "eos": np.asarray(sorted(eos), np.int64)}  # fmt: skip


def greedy_on_device(package: Path, spec: str, python: str, prompts: list[list[int]], new_tokens: int,
                     eos: set[int], threads: int = 0, runtime: str | None = None,
                     workdir: str | None = None) -> tuple[list[list[int]], dict]:  # fmt: skip
    """Greedy continuations of token ids, computed there: (the new tokens of each prompt, the device)."""
    options = ["--threads", str(threads), *(["--runtime", runtime] if runtime else [])]
    result = on_device(package, spec, python, "greedy", options, _prompts(prompts, new_tokens, eos), workdir)
    return result["tokens"], result["device"]


def _pieces(pieces: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([len(p) for p in pieces], np.int64)
    ends = np.cumsum(lengths)
    return np.asarray([t for p in pieces for t in p], np.int64), np.stack([ends - lengths, ends], axis=1)


def score_on_device(package: Path, spec: str, python: str, pieces: list[list[int]], skips: list[int],
                    want: np.ndarray, prompts: list[list[int]], new_tokens: int, eos: set[int], threads: int = 0,
                    workdir: str | None = None) -> tuple[dict, list[list[int]], dict]:  # fmt: skip
    """Score token ids there (each piece from an empty cache, its first `skip` rows dropped): per row, the log of
    the sum of exp(logits), the argmax, and the logits at `want`'s ids ([rows, k]); then greedy continuations of
    `prompts`. Returns (the rows' arrays, the continuations, the device)."""
    ids, bounds = _pieces(pieces)
    inputs = {"ids": ids, "bounds": bounds, "skip": np.asarray(skips, np.int64), "want": want.astype(np.int64),
              **_prompts(prompts, new_tokens, eos)}  # fmt: skip
    result = on_device(package, spec, python, "score", ["--threads", str(threads)], inputs, workdir)
    return {k: array(result[k]) for k in ("lse", "argmax", "picked")}, result["tokens"], result["device"]
