"""The ONNX target's package side (targets/registry.py): its files, what `verify` checks of them, and the
runtimes that run them. A device imports this from the pushed zip: only the runtime is imported, lazily."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.manifest import MANIFEST, Io, Manifest, TensorInfo
from mobilize.safe_io import quoted, read_json
from mobilize.targets.registry import Runtime

MODEL_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
CACHE_INPUTS = "past_key_values."
DEVICE_MODULES = ("targets/onnx/runner.py", "targets/onnx/genai_runner.py")


def adapter_file():
    """The LoRA adapter file of this format (`mobilize adapter`): SUFFIX, slot_name, write_adapter, read_adapter."""
    from mobilize.targets.onnx import adapter_file

    return adapter_file


def native_tools() -> dict:
    """No native benchmark binary is wired for ONNX packages (onnxruntime_perf_test times a graph, not a decoder)."""
    return {}


def check(path: Path, manifest: Manifest) -> None:
    """model.onnx's inputs and outputs are the manifest's, its external data lies inside the package's data file,
    and genai_config.json is exactly what export writes for this manifest."""
    import onnx

    try:
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    except Exception as e:  # the protobuf parser's errors are many; the file passed its hash, so say so
        raise MobilizeError(f"{quoted(path)}/model.onnx cannot be parsed ({type(e).__name__})") from None
    _check_external_data(path, model, manifest)

    def describe(values) -> tuple[TensorInfo, ...]:
        out = []
        for v in values:
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            out.append(TensorInfo(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type), tuple(dims)))
        return tuple(out)

    found = Io(describe(model.graph.input), describe(model.graph.output))
    for kind in ("inputs", "outputs"):
        if getattr(found, kind) != getattr(manifest.io, kind):
            raise MobilizeError(f"{path}: the model's {kind} are not the manifest's")
    _check_genai_config(path, manifest)


def _check_external_data(path: Path, model, manifest: Manifest) -> None:
    """Every tensor stored outside model.onnx points into a file of the package, within its bytes (ONNX Runtime
    would follow a `../` or an absolute location to any file on the device)."""
    import onnx

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(g)

    files = manifest.files
    for t in tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if location not in files or location in ("model.onnx", MANIFEST) or not location.endswith(".data"):
            raise MobilizeError(
                f"{quoted(path)}/model.onnx: tensor {quoted(t.name)} is stored in {quoted(location)}, not in a data "
                "file of the package"
            )
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"])
        except (KeyError, ValueError):
            raise MobilizeError(
                f"{quoted(path)}/model.onnx: tensor {quoted(t.name)} has no valid offset/length"
            ) from None
        if offset < 0 or length < 0 or offset + length > files[location].bytes:
            raise MobilizeError(f"{quoted(path)}/model.onnx: tensor {quoted(t.name)} lies outside {location}")


def _check_genai_config(path: Path, manifest: Manifest) -> None:
    """genai_config.json is what export writes for this manifest: ONNX Runtime GenAI reads it to decide what
    to load (a native library, other files, providers), so any other content is refused."""
    from mobilize.targets.onnx.genai_config import expected_genai_config

    if "genai_config.json" not in manifest.files:
        return
    found = read_json(path / "genai_config.json")
    try:
        expected = expected_genai_config(manifest, found)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MobilizeError(
            f"{quoted(path)}: the manifest cannot describe a genai_config.json ({type(e).__name__})"
        ) from None
    if found != expected:
        raise MobilizeError(f"{quoted(path)}: genai_config.json is not the one export writes for this manifest")


def _ort(path: Path, manifest: Manifest, threads: int, adapters: Mapping[str, dict[str, np.ndarray]]):
    from mobilize.targets.onnx.runner import OrtRunner

    runner = OrtRunner(path / "model.onnx", threads=threads)
    for name, params in adapters.items():
        runner.load_adapter(name, params)
    if adapters:
        runner.activate(next(iter(adapters)))
    return runner


def _genai(path: Path, manifest: Manifest, threads: int, adapters: Mapping[str, dict[str, np.ndarray]]):
    from mobilize.targets.onnx.genai_runner import GenAIRunner

    if adapters:
        raise MobilizeError("--adapter runs on the package's own runtime (onnxruntime), not through GenAI here")
    return GenAIRunner(path, threads)


RUNTIMES = {
    "ort": Runtime("onnxruntime: the KV cache bound in place (IOBinding)", runner=_ort),
    "genai": Runtime("ONNX Runtime GenAI: the runtime an app embeds, running the package as it is", runner=_genai),
}
