"""The export driver: source -> loaded model -> plain graph -> package directory, written atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mobilize.compiler import __version__
from mobilize.compiler.builder import build_decoder
from mobilize.compiler.checkpoint import load_model, open_checkpoint
from mobilize.compiler.errors import MobilizeError
from mobilize.compiler.pipeline import onnx_passes, recipe_named, run_passes
from mobilize.compiler.tokenizer import special_token_ids, write_tokenizer
from mobilize.targets.genai_config import genai_config
from mobilize.targets.onnx_writer import save_onnx

MANIFEST_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    source: str
    out: Path
    random_weights: bool = False
    overwrite: bool = False
    quant: str = "fp32"


def export(opts: ExportOptions, phase: Callable[[str], None] = lambda _: None) -> Path:
    """Write the package; the destination appears only once every file is complete."""
    out = opts.out.resolve()
    if out.exists() and not opts.overwrite:
        raise MobilizeError(f"{out} already exists; pass --overwrite to replace it")
    recipe = recipe_named(opts.quant)
    phase("reading checkpoint")
    model = load_model(open_checkpoint(opts.source, opts.random_weights))
    phase("building graph")
    graph = build_decoder(model)
    phase(f"passes ({recipe.name})")
    reports = run_passes(graph, onnx_passes(recipe))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        phase("writing model.onnx (weights streamed)")
        save_onnx(graph, tmp)
        phase("writing tokenizer")
        tokenizer_files = write_tokenizer(model.ckpt, tmp)
        config = dataclasses.asdict(model.config)
        genai = genai_config(config, special_token_ids(model.ckpt), model.config.max_position_embeddings)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2, sort_keys=True) + "\n")
        phase("writing manifest")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "mobilize_version": __version__,
            "source": {"id": model.ckpt.source, "format": model.ckpt.format},
            "architecture": config,
            "format": "onnx",
            "recipe": {"name": recipe.name, "description": recipe.description},
            "build_report": {"passes": reports},
            "kv_layout": "dynamic (past_key_values.{i}.key|value -> present.{i}.key|value)",
            "tokenizer": tokenizer_files or None,
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a package is for handing over
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
