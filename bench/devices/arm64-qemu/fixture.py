"""An arm64 device on this machine: Debian's arm64 userland under qemu-user, reached over OpenSSH on loopback, so
that `mobilize bench|run|eval PACKAGE --device ssh:arm64-qemu` run packages on the phone's instruction set (the
ARM builds of ONNX Runtime, ONNX Runtime GenAI, LiteRT and LiteRT-LM, their ARM kernels) as on a board.

    sudo python bench/devices/arm64-qemu/fixture.py start    # builds the root the first time, prints the config
    export MOBILIZE_SSH_CONFIG=<the printed path>
    mobilize bench out/gemma3-270m-android-onnx-int4 --device ssh:arm64-qemu
    sudo python bench/devices/arm64-qemu/fixture.py stop

The root is built once from recipe.toml (debootstrap, then the aarch64 wheels installed from this machine's pip)
and cached under mobilize's cache dir by the recipe's digest: a changed recipe builds a new one. `start` mounts
what the runtimes read (/proc, /dev, and an ARM description of the CPU: qemu-user shows the host's x86 one, which
the runtimes' CPU detection cannot parse) and starts sshd inside the root, whose sessions run every binary under
qemu with the recipe's core. The root marks itself emulated (/etc/mobilize-emulated): results from it say so,
and their speed is never a phone's. Needs root (chroot, mount) and Debian's qemu-user-static and debootstrap.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipe.toml"
NAME = "arm64-qemu"
VERSION = 1  # of this script's layout: part of the cache key
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU = Path("/usr/bin/qemu-aarch64-static")
SSHD_CONFIG = "/etc/ssh/mobilize_sshd_config"
PIDFILE = "/run/mobilize-sshd.pid"


class FixtureError(Exception):
    """One line for the person running it."""


def _recipe() -> dict:
    return tomllib.loads(RECIPE.read_text())


def cache_dir() -> Path:
    digest = hashlib.sha256(RECIPE.read_bytes() + f"version {VERSION}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOBILIZE_CACHE", Path.home() / ".cache" / "mobilize"))
    return (root / "devices" / NAME / digest).resolve()  # (mount points are compared as the kernel lists them)


def _run(cmd: list[str], what: str, log: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    if done.returncode:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise FixtureError(f"{what} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done


def _check_host() -> None:
    if os.geteuid() != 0:
        raise FixtureError("the arm64 fixture needs root (debootstrap, chroot, mount): run it with sudo")
    def missing() -> list[str]:
        return [p for p, there in (("debootstrap", shutil.which("debootstrap")), ("qemu-user-static", QEMU.is_file()))
                if not there]  # fmt: skip

    if missing() and shutil.which("apt-get"):  # Debian's own packages, from its registry
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], "apt-get update", env=env)
        _run(["apt-get", "install", "-y", "-q", *missing()], "apt-get install", env=env)
    if missing():
        raise FixtureError(f"needs {' and '.join(missing())}: apt-get install qemu-user-static debootstrap")


def ensure_binfmt() -> None:
    """The kernel runs aarch64 binaries through qemu (binfmt_misc), with the interpreter opened at registration
    (flag F), so that it works inside the chroot."""
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mounting binfmt_misc")
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        flags = next((line.split(":", 1)[1].strip() for line in entry.read_text().splitlines()
                      if line.startswith("flags:")), "")  # fmt: skip
        if "F" not in flags:
            raise FixtureError(f"{entry} is registered without the F flag (a chroot cannot find qemu): "
                               f"echo -1 > {entry}, then start again")  # fmt: skip
        return
    conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
    if not conf.is_file():
        raise FixtureError(f"{conf} is missing: apt-get install qemu-user-static")
    (BINFMT / "register").write_text(conf.read_text().strip())


def build() -> Path:
    """The device root for the recipe (built once; an interrupted build is started over). A build already running
    (CI starts one beside the install) is waited for."""
    import fcntl

    _check_host()
    dest = cache_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return dest if (dest / "complete").is_file() else _build(dest)


def _build(dest: Path) -> Path:
    recipe = _recipe()
    ensure_binfmt()
    tmp = dest.with_name(dest.name + ".partial")
    _remove(tmp)
    tmp.mkdir(parents=True)
    log = tmp / "build.log"
    root = tmp / "root"
    deb = recipe["debian"]
    started = time.monotonic()
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(deb['packages'])}",
          deb["suite"], str(root), deb["mirror"]], "debootstrap", log)  # fmt: skip
    py = recipe["python"]
    site = root / "usr" / "local" / "lib" / f"python{py['version']}" / "dist-packages"
    platforms = [arg for p in py["platforms"] for arg in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
          "--target", str(site), *platforms, "--python-version", py["version"], "--implementation", "cp",
          "--only-binary=:all:", *py["wheels"]], "installing the aarch64 wheels", log)  # fmt: skip
    _ssh_setup(tmp, root, recipe)
    qemu = _run([str(QEMU), "--version"], "qemu").stdout.splitlines()[0]
    (root / "etc" / "mobilize-emulated").write_text(f"{qemu} (-cpu {recipe['qemu']['cpu']}) on {platform.machine()}\n")
    (tmp / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
    (tmp / "complete").write_text("")
    _remove(dest)
    tmp.rename(dest)
    return dest


def _mount_points() -> list[str]:
    """Every mount point, as /proc/self/mounts lists it (octal escapes for spaces and the like decoded)."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points]


def _remove(path: Path) -> None:
    """Delete a (partial) root, unmounting first whatever is mounted inside it (an interrupted debootstrap may
    leave its /proc or a bind of the host's /dev there: deleting through a mount would delete the host's files),
    and never crossing into another filesystem while deleting."""
    path = path.resolve()
    for where in sorted((p for p in _mount_points() if p.startswith(f"{path}/")), key=len, reverse=True):
        _run(["umount", "-l", where], f"unmounting {where}")
    if not path.exists():
        return
    if any(p.startswith(f"{path}/") for p in _mount_points()):
        raise FixtureError(f"{path} still has mounts inside it; not deleting it")
    device = path.stat().st_dev
    for top, dirs, files in os.walk(path, topdown=False):
        for name in files + dirs:
            item = Path(top) / name
            st = item.lstat()
            if st.st_dev != device:
                raise FixtureError(f"{item} is on another filesystem; not deleting {path}")
            item.rmdir() if stat.S_ISDIR(st.st_mode) else item.unlink()
    path.rmdir()


def _ssh_setup(home: Path, root: Path, recipe: dict) -> None:
    """Host and client keys made here (the host's ssh-keygen), key login as root only, and every session's
    programs run on the recipe's core (qemu reads QEMU_CPU from their environment)."""
    keygen = lambda path: _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], "ssh-keygen")  # noqa: E731
    keygen(root / "etc" / "ssh" / "mobilize_host_key")
    keygen(home / "client_key")
    (root / "etc" / "ssh" / "mobilize_authorized_keys").write_text((home / "client_key.pub").read_text())
    (root / "run" / "sshd").mkdir(parents=True, exist_ok=True)
    (root / SSHD_CONFIG.lstrip("/")).write_text(
        "ListenAddress 127.0.0.1\nHostKey /etc/ssh/mobilize_host_key\nPermitRootLogin prohibit-password\n"
        "AuthorizedKeysFile /etc/ssh/mobilize_authorized_keys\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
        f"PidFile {PIDFILE}\nSetEnv QEMU_CPU={recipe['qemu']['cpu']}\n"
    )
    q = recipe["qemu"]
    cpus = os.cpu_count() or 1
    cpu = "".join(f"processor\t: {i}\nBogoMIPS\t: 48.00\nFeatures\t: {q['features']}\nCPU implementer\t: 0x41\n"
                  f"CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: {q['cpu_part']}\nCPU revision\t: 1\n\n"
                  for i in range(cpus))  # fmt: skip
    (home / "cpuinfo").write_text(cpu)
    (home / "cpu").mkdir()
    for name in ("possible", "present", "online"):
        (home / "cpu" / name).write_text(f"0-{cpus - 1}\n" if cpus > 1 else "0\n")


def _mounts(home: Path) -> list[tuple[list[str], Path]]:
    """(mount arguments, where), in mounting order."""
    root = home / "root"
    return [
        (["-t", "proc", "proc"], root / "proc"),
        (["--bind", "/dev"], root / "dev"),
        (["--bind", str(home / "cpuinfo")], root / "proc" / "cpuinfo"),
        (["--bind", str(home / "cpu")], root / "sys" / "devices" / "system" / "cpu"),
    ]


def _mounted(path: Path) -> bool:
    return str(path) in _mount_points()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(config: Path) -> bool:
    """The device's sshd answers on the port its config names."""
    try:
        port = int(next(line.split()[1] for line in config.read_text().splitlines() if line.strip().startswith("Port")))
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except (OSError, StopIteration, ValueError, IndexError):
        return False


def start(port: int | None = None) -> Path:
    """The device, running: its ssh config's path (Host arm64-qemu)."""
    home = build()
    ensure_binfmt()
    config = home / "ssh_config"
    if _listening(config):
        return config
    for args, where in _mounts(home):
        if not where.exists():  # (/proc/cpuinfo exists once /proc is mounted)
            where.mkdir(parents=True)
        if not _mounted(where):
            _run(["mount", *args, str(where)], f"mounting {where}")
    port = port or _free_port()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": _recipe()["qemu"]["cpu"]}
    _run(["chroot", str(home / "root"), "/usr/sbin/sshd", "-f", SSHD_CONFIG, "-p", str(port)], "starting sshd",
         env=env)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise FixtureError(f"sshd in the arm64 root did not listen on port {port} within a minute") from None
            time.sleep(0.5)
    config.write_text(
        f"Host {NAME}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {home / 'client_key'}\n"
        "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    if os.environ.get("SUDO_UID", "").isdigit():  # started with sudo: the config and the key are the user's to use
        for path in (config, home / "client_key"):
            os.chown(path, int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "0") or 0))
    return config


def stop() -> None:
    """Stop sshd and whatever runs in the root, and unmount what `start` mounted."""
    home = cache_dir()
    root = (home / "root").resolve()
    if not root.is_dir():
        return
    for proc in Path("/proc").iterdir():  # sshd, and any session still running there
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "root")) == root:
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass
    (root / PIDFILE.lstrip("/")).unlink(missing_ok=True)
    (home / "ssh_config").unlink(missing_ok=True)
    time.sleep(0.2)
    for _, where in reversed(_mounts(home)):
        if _mounted(where):
            _run(["umount", "-l", str(where)], f"unmounting {where}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="an arm64 device under qemu-user, reached over ssh on loopback")
    ap.add_argument("command", choices=("build", "start", "stop", "where"))
    ap.add_argument("--port", type=int, default=None, help="start: the loopback port (default: a free one)")
    args = ap.parse_args(argv)
    try:
        if args.command == "build":
            print(build())
        elif args.command == "start":
            print(start(args.port))
        elif args.command == "stop":
            stop()
        else:
            print(cache_dir())
    except FixtureError as e:
        print(f"arm64-qemu: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
