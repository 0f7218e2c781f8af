"""Benchmark a package on another machine: `mobilize bench PACKAGE --device adb:SERIAL|ssh:HOST|local`.

The package and a zip of mobilize's runtime (harness/remote_bench.py lists it) are pushed to a
working directory there, `remote_bench` measures the package with the same code the host uses, and its
JSON comes back (the device's stdout) as the host bench's result, with the device described in it.

- `ssh:HOST`: OpenSSH (`ssh`, with `-F $MOBILIZE_SSH_CONFIG` when that is set; keys, ports and users come
  from the ssh config as usual); files go through `tar` on both ends. Linux boards, Termux on a phone.
- `adb:SERIAL`: `adb -s SERIAL push` and `adb -s SERIAL shell`; the phone needs a Python 3 with numpy
  and the package's runtime (see the README: Termux).
- `local`: this machine, in a temporary directory: the same path end to end without a device.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from mobilize.errors import MobilizeError
from mobilize.harness.remote_bench import RUNTIME_MODULES

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
    workdir: str

    def run(self, command: str, timeout: int) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def push(self, local: Path, name: str) -> None:
        raise NotImplementedError


class LocalDevice(Device):
    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mobilize-device-")
        self.workdir = self._tmp.name

    def run(self, command, timeout):
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)

    def push(self, local, name):
        dest = Path(self.workdir) / name
        if local.is_dir():
            shutil.copytree(local, dest, dirs_exist_ok=True)
        else:
            shutil.copyfile(local, dest)


class SshDevice(Device):
    def __init__(self, host: str, workdir: str) -> None:
        self.host, self.workdir = host, workdir
        config = os.environ.get("MOBILIZE_SSH_CONFIG")
        self.ssh = ["ssh", *(["-F", config] if config else []), "-o", "BatchMode=yes", host]

    def run(self, command, timeout):
        return subprocess.run([*self.ssh, command], capture_output=True, text=True, timeout=timeout)

    def push(self, local, name):
        q = shlex.quote
        target = f"mkdir -p {q(self.workdir)} && tar -C {q(self.workdir)} -xf -"
        tar = subprocess.Popen(["tar", "-C", str(local.parent), "-cf", "-", local.name], stdout=subprocess.PIPE)
        done = subprocess.run([*self.ssh, target], stdin=tar.stdout, capture_output=True, text=True, timeout=3600)
        tar.stdout.close()
        tar.wait()
        if done.returncode or tar.returncode:
            raise MobilizeError(f"could not copy {local.name} to {self.host}: {_last_line(done.stderr)}")
        if local.name != name:
            self.run(f"mv {q(self.workdir + '/' + local.name)} {q(self.workdir + '/' + name)}", 60)


class AdbDevice(Device):
    def __init__(self, serial: str, workdir: str) -> None:
        self.adb, self.workdir = ["adb", "-s", serial], workdir
        self.serial = serial

    def run(self, command, timeout):
        return subprocess.run([*self.adb, "shell", command], capture_output=True, text=True, timeout=timeout)

    def push(self, local, name):
        self.run(f"mkdir -p {shlex.quote(self.workdir)}", 60)
        done = subprocess.run([*self.adb, "push", str(local), f"{self.workdir}/{name}"], capture_output=True,
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


def bench_on_device(package: Path, spec: str, python: str, threads: int, prompt_len: int, gen_len: int,
                    repeats: int, workdir: str | None = None) -> dict:  # fmt: skip
    """Push, measure there, and return the result (the host bench's JSON, with `device`)."""
    device = open_device(spec, workdir)
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / ZIP_NAME
        payload.write_bytes(runtime_zip())
        device.push(payload, ZIP_NAME)
    device.push(package.resolve(), "package")
    q = shlex.quote
    command = (
        f"cd {q(device.workdir)} && PYTHONPATH={ZIP_NAME} {q(python)} -m mobilize.harness.remote_bench "
        f"package --threads {threads} --prompt-len {prompt_len} --gen-len {gen_len} --repeats {repeats}"
    )
    done = device.run(command, timeout=3600)
    if done.returncode:
        raise MobilizeError(f"the benchmark failed on {spec}: {_last_line(done.stderr)}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise MobilizeError(f"{spec} printed no benchmark result: {_last_line(done.stdout)}") from None
    result["device"] = {"spec": spec, **result.get("device", {})}
    return result
