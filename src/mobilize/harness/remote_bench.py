"""What runs on the device: check the pushed package's bytes, measure it, print the host bench's JSON.

Pushed with a small zip of mobilize's runtime (this module, the runners, perf, the package reader and
verify); the device needs Python 3 with numpy and onnxruntime (ONNX packages) or ai-edge-litert
(TFLite packages), nothing else of mobilize's:

    PYTHONPATH=mobilize-runtime.zip python3 -m mobilize.harness.remote_bench PACKAGE [--threads N] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

# The modules pushed to a device, by path inside the `mobilize` package: enough to verify and measure a package
# (and each target's package side: harness/device.py adds them).
RUNTIME_MODULES = [
    "__init__.py", "errors.py", "safe_io.py", "optional.py", "manifest.py", "package/__init__.py",
    "package/verify.py", "harness/__init__.py", "harness/runner.py", "harness/perf.py", "harness/package.py",
    "harness/remote_bench.py", "targets/__init__.py", "targets/registry.py",
]  # fmt: skip


def device_info() -> dict:
    return {
        "machine": platform.machine(),
        "system": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="measure a mobilize package on this device")
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from mobilize.errors import MobilizeError
    from mobilize.harness.package import Package
    from mobilize.harness.perf import measure
    from mobilize.package.verify import verify_package

    try:
        manifest = verify_package(args.package, check_io=False)  # hashes; the host checked the I/O
        runner = Package(Path(args.package), manifest).runner(args.threads)
        vocab = manifest.architecture.vocab_size
        result = measure(runner, vocab, args.prompt_len, args.gen_len, args.repeats)
    except MobilizeError as e:
        print(f"mobilize (on the device): error: {e}", file=sys.stderr)
        return 1
    result["device"] = device_info()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
