"""LoRA slots in a LiteRT model, and the adapter file that fills them, named as litert-torch and LiteRT-LM name them.

A package exported with `--lora-slots R` has its signatures (`prefill_<L>`, `decode`) take one more pair of float32
inputs per slot, `lora_atten_<q|k|v|o>_a_prime_weight_<layer>` [in, R] and `..._b_prime_weight_<layer>` [R, out],
whose product is added to the projection's output (the adapter's scale folded into b). These are the input names
litert-torch gives and LiteRT-LM's LoRA loader matches (`runtime/util/lora_util.cc`); it knows none for MLP
projections, so a TFLite package has slots on attention projections only. All-zero inputs are the base model.

The inputs are in the plain signatures because that is where LiteRT-LM's CPU executor binds them: it reads the LoRA
input names of `decode` and binds the adapter's buffers to them in `decode` and in every signature whose name starts
with "prefill" (measured with litert-lm-api 0.18.1, and read in its executor). litert-torch's separate
`prefill_<L>_lora_r<R>` / `decode_lora_r<R>` signatures are not used there, and worse, "prefill_128_lora_r16" counts
as a prefill signature of length 128: a package holding both ran the base's prompts through LoRA graphs whose inputs
nothing had set (other text than the base's, measured).

LiteRT-LM leaves the slots' inputs unset when a session has no adapter: the engine then writes `<pad>` (measured). A
package with slots therefore carries `no-adapter.lora.tflite` (`EMPTY`), the all-zero adapter: a session given it
runs the base model. mobilize's own runner sets zeros itself when no adapter is active.

The adapter file is what LiteRT-LM's `FlatBufferLoraData` reads (`runtime/util/lora_data.cc`): a TFLite flatbuffer
whose tensors carry those names, their bytes in buffers after the flatbuffer (offset and size), a metadata entry
`lora_rank` whose buffer field is the rank (16 or 32 for LiteRT-LM 0.18: "Currently only support rank 16 and 32"), and
the file padded to whole pages (it maps each tensor in pages). mobilize adds `mobilize_base`: the digest of the
package's model files it was made for (package/adapter.py), so that it is refused on any other base.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.safe_io import quoted

SUFFIX = ".lora.tflite"
LITERT_LM_RANKS = (16, 32)  # "Currently only support rank 16 and 32" (litert-lm-api 0.18.1)
EMPTY = "no-adapter.lora.tflite"  # in a package with slots: what a LiteRT-LM session runs the base with
PAGE = 4096  # (memory_mapped_file_posix.cc: "the file size is not a multiple of the OS alignment")
ATTENTION = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_MODULE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)$")
_BASE_KEY = "mobilize_base"


def slot_name(module: str, half: str) -> str:
    """The input name of a slot's A or B: model.layers.3.self_attn.q_proj, "A" -> lora_atten_q_a_prime_weight_3."""
    m = _MODULE.match(module)
    if m is None:
        raise MobilizeError(f"{quoted(module)}: TFLite LoRA slots are on attention projections only (q, k, v, o), "
                            "the ones LiteRT-LM binds")  # fmt: skip
    return f"lora_atten_{ATTENTION[m.group(2)]}_{half.lower()}_prime_weight_{m.group(1)}"


def write_adapter(path: Path, tensors: dict[str, np.ndarray], base: int, rank: int) -> None:
    """The adapter file: one weights-only graph (no operators) whose tensors are the slot inputs' values."""
    from mobilize.targets.tflite.writer import TflModel

    model = TflModel("mobilize LoRA adapter")
    g = model.graph("lora")
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, np.float32)
        g.weight(name, value.shape, np.float32, value.nbytes, lambda v=value: v)
    model.metadata[_BASE_KEY] = np.int64(base).tobytes()
    model.buffer_metadata["lora_rank"] = rank
    size = model.write(path)
    with open(path, "ab") as f:  # LiteRT-LM maps each tensor in whole pages: the file must end on one
        f.write(b"\0" * (-size % PAGE))
        f.flush()
        os.fsync(f.fileno())


def read_adapter(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(the base digest it was made for, its tensors by name); one line if it is not such a file."""
    from ai_edge_litert import schema_py_generated as fb

    not_ours = f"--adapter {quoted(path)} is not a LiteRT LoRA adapter file ({SUFFIX}, written by mobilize adapter)"
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if len(data) < 8 or data[4:8] != b"TFL3":
                raise MobilizeError(not_ours)
            model = fb.Model.GetRootAs(data, 0)
            entries = [model.Metadata(i) for i in range(model.MetadataLength())]
            meta = {entry.Name().decode(): entry.Buffer() for entry in entries}
            if _BASE_KEY not in meta or "lora_rank" not in meta:
                raise MobilizeError(not_ours)
            buffers = model.BuffersLength()

            def buffer(index: int):
                if not 0 < index < buffers:
                    raise MobilizeError(not_ours)
                return model.Buffers(index)

            base = int(np.frombuffer(buffer(meta[_BASE_KEY]).DataAsNumpy().tobytes(), np.int64)[0])
            rank = meta["lora_rank"]
            out = {}
            for s in range(model.SubgraphsLength()):
                graph = model.Subgraphs(s)
                for t in range(graph.TensorsLength()):
                    tensor = graph.Tensors(t)
                    name = tensor.Name().decode()
                    where = f"--adapter {quoted(path)}: tensor {quoted(name)}"
                    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
                    if tensor.Type() != fb.TensorType.FLOAT32 or len(shape) != 2 or min(shape) < 1:
                        raise MobilizeError(f"{where} is not a float32 matrix")
                    if name in out:
                        raise MobilizeError(f"{where} appears twice")
                    if shape[1 if "_a_prime_" in name else 0] != rank:
                        raise MobilizeError(f"{where} is {list(shape)}, not of the file's lora_rank {rank}")
                    buf, size = buffer(tensor.Buffer()), 4 * math.prod(shape)
                    off = buf.Offset()
                    if buf.Size() != size or off <= 1 or off + size > len(data):
                        raise MobilizeError(f"{where}: its bytes are not in the file (cut short?)")
                    out[name] = np.frombuffer(data[off : off + size], np.float32).reshape(shape).copy()
            return base, out
    except MobilizeError:
        raise
    except Exception:  # a flatbuffer that does not parse: its reader's errors are many
        raise MobilizeError(not_ours) from None
