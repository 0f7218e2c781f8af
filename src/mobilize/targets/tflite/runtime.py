"""The TFLite target's package side (targets/registry.py): its files, what `verify` checks of them, and the
runtimes that run them. A device imports this from the pushed zip: only the runtime is imported, lazily."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.manifest import Io, Manifest
from mobilize.targets.registry import Runtime

MODEL_FILES = ("model.tflite", "model.litertlm", "no-adapter.lora.tflite")
CACHE_INPUTS = "kv_cache_"
DEVICE_MODULES = ("targets/tflite/runner.py", "targets/tflite/writer.py", "targets/tflite/litertlm_bench.py")


def adapter_file():
    """The LoRA adapter file of this format (`mobilize adapter`): SUFFIX, slot_name, write_adapter, read_adapter."""
    from mobilize.targets.tflite import lora

    return lora


def native_tools():
    """The runtimes' own benchmark binaries, by name (`bench --device ... --native PATH`): targets/tflite/native.py."""
    from mobilize.targets.tflite.native import TOOLS

    return TOOLS


def check(path: Path, manifest: Manifest) -> None:
    """Every buffer of model.tflite lies inside the file, and its signatures are the manifest's."""
    from mobilize.targets.tflite.writer import check_buffers, tflite_io

    try:
        check_buffers(path / "model.tflite")
        found = Io.parse(tflite_io(path / "model.tflite"), "model.tflite")
    except MobilizeError:
        raise
    except Exception as e:  # a flatbuffer that passed its hash but does not parse
        raise MobilizeError(f"{path}/model.tflite cannot be parsed ({type(e).__name__})") from None
    if found != manifest.io:
        raise MobilizeError(f"{path}: the model's signatures are not the manifest's")


def _litert(path: Path, manifest: Manifest, threads: int, adapters: Mapping[str, dict[str, np.ndarray]]):
    from mobilize.targets.tflite.runner import LiteRtRunner

    runner = LiteRtRunner(path / "model.tflite", threads=threads)
    for name, params in adapters.items():
        runner.load_adapter(name, params)
    if adapters:
        runner.activate(next(iter(adapters)))
    return runner


def _litert_lm(path: Path, threads: int, prompt_len: int, gen_len: int) -> tuple[float, float, float]:
    from mobilize.targets.tflite.litertlm_bench import run_litertlm

    return run_litertlm(path / "model.litertlm", threads, prompt_len, gen_len)


RUNTIMES = {
    "litert": Runtime("LiteRT's interpreter: the signatures run in turn, the cache kept in its tensors",
                      runner=_litert),  # fmt: skip
    "litert-lm": Runtime("LiteRT-LM's engine on the package's model.litertlm (export --bundle litertlm)",
                         measure=_litert_lm),  # fmt: skip
}
