"""What runs on the device: check the pushed package's bytes, then measure it, run it greedily, or score token
ids with it, and print the result as one JSON line for the host (harness/device.py), which computes the rest.

Pushed with a small zip of mobilize's runtime (RUNTIME_MODULES and each target's runtime side); the device needs
Python 3 with numpy and the package's runtime (onnxruntime, onnxruntime-genai, ai-edge-litert, litert-lm-api),
nothing else of mobilize's:

    PYTHONPATH=mobilize-runtime.zip python3 -m mobilize.harness.remote bench|greedy|score PACKAGE [options]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import sys
from pathlib import Path

# The modules pushed to a device, by path inside the `mobilize` package: enough to verify, run and measure a
# package (each target's package side is added by harness/device.py).
RUNTIME_MODULES = [
    "__init__.py", "errors.py", "safe_io.py", "optional.py", "manifest.py", "package/__init__.py",
    "package/verify.py", "harness/__init__.py", "harness/runner.py", "harness/perf.py", "harness/package.py",
    "harness/remote.py", "targets/__init__.py", "targets/registry.py",
]  # fmt: skip
# Written into a device root by a fixture that emulates its CPU (bench/devices/arm64-qemu): what emulates it.
EMULATION_MARKER = "/etc/mobilize-emulated"


def emulation(marker: str = EMULATION_MARKER, cpuinfo: str = "/proc/cpuinfo", machine: str | None = None) -> str | None:
    """How this device is emulated, if it is: a fixture's marker, or an ARM userland whose kernel describes an
    x86 CPU (qemu-user). Its speed is not the device's, and is never compared with real ones."""
    try:
        said = Path(marker).read_text().strip()
        return said[:200] or "emulated"
    except OSError:
        pass
    machine = (machine or platform.machine()).lower()
    if machine.startswith(("aarch64", "arm")):
        try:
            cpuinfo = Path(cpuinfo).read_text()
        except OSError:
            return None
        if re.search(r"^(vendor_id|flags)\s*:", cpuinfo, re.M):  # x86 fields: the kernel runs on an x86 CPU
            return f"qemu-user: a {machine} userland on an x86 CPU"
    return None


VERIFY_FAILED = 3  # the exit code when the package's files here are not its manifest's


class _NotAsPushed(Exception):
    """The package's files here are not what its manifest says."""


def device_info() -> dict:
    return {
        "machine": platform.machine(),
        "system": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "emulated": emulation(),
    }


def _array(a) -> dict:
    """A numpy array as JSON, exactly (base64 of its little-endian bytes)."""
    import numpy as np

    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def _score(runner, inputs) -> dict:
    """For each piece of token ids (scored from an empty cache, its first `skip` rows not returned): per row, the
    log of the sum of exp(logits), the argmax, and the logits at the ids the host asks for (its reference's most
    likely tokens and the next token): the host computes perplexity, top-1 agreement and KL from these."""
    import numpy as np

    from mobilize.harness.runner import score

    ids, bounds, skips, want = inputs["ids"], inputs["bounds"], inputs["skip"], inputs["want"]
    lse, argmax, picked, row = [], [], [], 0
    for (start, end), skip in zip(bounds, skips, strict=True):
        logits = score(runner, ids[start:end].tolist())[skip:].astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        lse.append((top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0])
        argmax.append(logits.argmax(axis=-1))
        n = len(logits)
        picked.append(np.take_along_axis(logits, want[row : row + n], axis=-1))
        row += n
    return {"lse": _array(np.concatenate(lse)), "argmax": _array(np.concatenate(argmax).astype(np.int64)),
            "picked": _array(np.concatenate(picked).astype(np.float32))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="verify, then measure, run or score a mobilize package on this device")
    ap.add_argument("command", choices=("bench", "greedy", "score"))
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runtime", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inputs", default=None, help="greedy, score: an .npz of token ids the host wrote")
    args = ap.parse_args(argv)

    from mobilize.errors import MobilizeError

    try:
        result = _run(args)
    except _NotAsPushed as e:  # the host pushes the package again
        print(f"mobilize (on the device): error: {e}", file=sys.stderr)
        return VERIFY_FAILED
    except MobilizeError as e:
        print(f"mobilize (on the device): error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # the runtime (or numpy) is not installed for this Python
        print(f"mobilize (on the device): error: {e.name} is not installed for {sys.executable} here "
              f"(pip install {e.name.split('.')[0].replace('_', '-')})", file=sys.stderr)  # fmt: skip
        return 1
    result["device"] = device_info()
    print(json.dumps(result))
    return 0


def _run(args) -> dict:
    import numpy  # noqa: F401  (first: a device without numpy is told so before anything else)

    from mobilize.errors import MobilizeError
    from mobilize.harness.package import Package
    from mobilize.package.verify import verify_package
    from mobilize.targets.registry import runtimes

    try:
        manifest = verify_package(args.package, check_io=False)  # the bytes; the host checked the I/O
    except MobilizeError as e:
        raise _NotAsPushed(str(e)) from None
    package = Package(Path(args.package), manifest)
    available = runtimes(manifest.format)
    name = args.runtime or next(iter(available))
    if args.command == "bench" and name in available and available[name].measure is not None:
        from mobilize.harness.perf import measure_engine

        run = lambda: available[name].measure(package.path, args.threads, args.prompt_len, args.gen_len)  # noqa: E731
        return measure_engine(run, args.prompt_len, args.gen_len, args.repeats)
    runner = package.runner(args.threads, runtime=name)
    if args.command == "bench":
        from mobilize.harness.perf import measure

        return measure(runner, manifest.architecture.vocab_size, args.prompt_len, args.gen_len, args.repeats)
    import numpy as np

    with np.load(args.inputs) as f:
        inputs = {k: f[k] for k in f.files}
    result = _score(runner, inputs) if args.command == "score" else {}
    if "prompt_ids" in inputs:  # greedy continuations (after scoring, for eval: one push)
        eos = set(inputs["eos"].tolist())
        prompts = [inputs["prompt_ids"][a:b].tolist() for a, b in inputs["prompt_bounds"]]
        from mobilize.harness.runner import greedy

        result["tokens"] = [greedy(runner, p, int(inputs["new_tokens"]), eos) for p in prompts]
    return result


if __name__ == "__main__":
    sys.exit(main())
