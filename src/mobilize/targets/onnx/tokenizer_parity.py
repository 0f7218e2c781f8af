"""Tokenizer parity at export: the package's tokenizer.json (what mobilize's runner and the app's own code use)
against ONNX Runtime GenAI's tokenizer (onnxruntime-extensions, a second implementation, what `og.Tokenizer`
gives an app) on a few hundred strings: leading and repeated whitespace, digits, emoji, code, other scripts, and
the special tokens written out. A mismatch stops the export in one line; GenAI not installed, or a vocabulary
type it does not read (it reads BPE only), is recorded as not checked.

GenAI's tokenizer is made from a package directory holding a model; a one-node stand-in graph stands in for the
real one, so a 7B's weights are not loaded to check its tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mobilize import cache_root
from mobilize.errors import MobilizeError
from mobilize.frontend.tokenizer import TOKENIZER_FILES
from mobilize.targets.parity import first_difference, parity_strings


def check_with_genai(package: Path) -> dict[str, Any]:
    """Compare the package's tokenizer with GenAI's on `parity_strings`; return what the manifest records."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"genai": "not checked: onnxruntime-genai is not installed"}
    from tokenizers import Tokenizer

    if not (package / "tokenizer.json").is_file():
        return {"genai": "not checked: the package has no tokenizer.json"}
    ours = Tokenizer.from_file(str(package / "tokenizer.json"))
    kind = json.loads(ours.to_str()).get("model", {}).get("type")
    if kind != "BPE":
        return {"genai": f"not checked: GenAI's tokenizer reads BPE vocabularies only (this one is {kind})"}
    strings = parity_strings(ours)
    key = _digest(package, og.__version__, strings)
    done = cache_root() / "tokenizer-parity" / key
    if done.is_file():  # these very files passed with this GenAI before (a 262k vocabulary takes GenAI ~3 s)
        return {"genai": done.read_text().strip()}
    with tempfile.TemporaryDirectory(prefix="mobilize-tokenizer-") as d:
        stand_in = _stand_in(package, Path(d))
        try:
            theirs = og.Tokenizer(og.Model(str(stand_in)))
            theirs.update_options(add_special_tokens="true")
            encoded = [[int(t) for t in theirs.encode(s)] for s in strings]
        except Exception as e:  # GenAI's errors are plain RuntimeErrors with its message
            raise MobilizeError(f"ONNX Runtime GenAI cannot read this package's tokenizer: {str(e)[:200]}") from None
    mine = [ours.encode(s).ids for s in strings]
    first_difference("ONNX Runtime GenAI", strings, mine, encoded)
    result = f"{len(strings)} strings encode the same (special tokens on, as the package README says)"
    try:
        done.parent.mkdir(parents=True, exist_ok=True)
        partial = done.with_name(f".{key}.{os.getpid()}")
        partial.write_text(result + "\n")
        os.replace(partial, done)
    except OSError:
        pass  # a read-only cache only costs the next export the check again
    return {"genai": result}


def _digest(package: Path, version: str, strings: list[str]) -> str:
    h = hashlib.sha256(version.encode() + json.dumps(strings).encode())
    for name in (*TOKENIZER_FILES, "genai_config.json"):
        h.update(name.encode() + b"\0" + ((package / name).read_bytes() if (package / name).is_file() else b"-"))
    return h.hexdigest()


def _stand_in(package: Path, d: Path) -> Path:
    """A directory GenAI can open for its tokenizer: the package's tokenizer files and genai_config.json, and a
    one-node graph in place of the model."""
    import onnx
    from onnx import TensorProto, helper

    for name in TOKENIZER_FILES:
        if (package / name).is_file():
            shutil.copyfile(package / name, d / name)
    config = json.loads((package / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "stand_in.onnx"
    (d / "genai_config.json").write_text(json.dumps(config))
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "seq"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "stand_in", [ids], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "stand_in.onnx")
    return d
