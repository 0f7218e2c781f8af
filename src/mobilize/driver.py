"""The export driver: source -> loaded model -> plain graph -> package directory, written atomically."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mobilize import __version__
from mobilize.errors import MobilizeError
from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.frontend.tokenizer import (
    convert_in_background,
    ensure_tokenizer_json,
    has_tokenizer_json,
    special_token_ids,
    write_tokenizer,
)
from mobilize.package.fit import fit
from mobilize.package.readme import package_readme
from mobilize.package.verify import sha256_file
from mobilize.partials import remove_dead
from mobilize.quant.calibrate import RANKING_TOKENS, CalibrationInBackground, calibrate
from mobilize.targets.onnx.emitter import build_decoder
from mobilize.targets.onnx.genai_config import genai_config, graph_io
from mobilize.targets.onnx.passes.kv_cache import static_kv
from mobilize.targets.onnx.pipeline import OPSETS, onnx_passes, recipe_named, run_passes, summarize
from mobilize.targets.onnx.writer import save_onnx
from mobilize.targets.presets import FORMATS, PRESETS
from mobilize.targets.tflite.emitter import build_tflite, tflite_io, tflite_kv
from mobilize.targets.tflite.litertlm import write_litertlm

MANIFEST_SCHEMA = 1


LOGITS = ("last", "all")  # --logits: the ONNX logits output's positions


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    source: str
    out: Path
    random_weights: bool = False
    overwrite: bool = False
    quant: str | None = None  # None: the target's
    target: str = "android"
    format: str | None = None
    max_seq_len: int | None = None
    opset: str = "ort"
    prefill_lens: tuple[int, ...] = (32, 128)  # tflite: one prefill_<L> signature each
    bundle: str | None = None  # tflite: "litertlm" also writes model.litertlm
    logits: str = "last"  # onnx: the logits output of the "last" position only, or of "all"

    def resolved(self) -> ExportOptions:
        """Every choice the target leaves to its preset filled in; errors for unknown names."""
        if self.target not in PRESETS:
            raise MobilizeError(f"unknown target {self.target!r} (known: {', '.join(PRESETS)})")
        preset = PRESETS[self.target]
        fmt = self.format or preset.format
        if fmt not in FORMATS:
            raise MobilizeError(f"format {fmt!r} is not available (known: {', '.join(FORMATS)})")
        if self.opset not in OPSETS:
            raise MobilizeError(f"unknown --opset {self.opset!r} (known: {', '.join(OPSETS)})")
        if self.bundle not in (None, "litertlm"):
            raise MobilizeError(f"unknown --bundle {self.bundle!r} (known: litertlm)")
        if self.logits not in LOGITS:
            raise MobilizeError(f"unknown --logits {self.logits!r} (known: {', '.join(LOGITS)})")
        if self.logits != "last" and fmt != "onnx":
            raise MobilizeError("--logits all is for ONNX packages (TFLite's signatures give the last position's)")
        if self.bundle and fmt != "tflite":
            raise MobilizeError("--bundle litertlm packs a TFLite model: use it with --format tflite")
        if not self.prefill_lens or any(not 1 <= n <= 1 << 16 for n in self.prefill_lens):
            raise MobilizeError(f"--prefill-len {list(self.prefill_lens)}: each must be from 1 to {1 << 16}")
        if self.max_seq_len is not None and not 1 <= self.max_seq_len <= 1 << 20:
            raise MobilizeError(f"--max-seq-len {self.max_seq_len} is out of range (1..{1 << 20})")
        return dataclasses.replace(self, quant=self.quant or preset.quant, format=fmt)

    def kv_length(self, context: int) -> int:
        """--max-seq-len if given (it may not pass the model's context), else the preset's, capped by it."""
        if self.max_seq_len is None:
            return min(PRESETS[self.target].max_seq_len, context)
        if self.max_seq_len > context:
            raise MobilizeError(f"--max-seq-len {self.max_seq_len} is past the model's context of {context}")
        return self.max_seq_len


def export(opts: ExportOptions, phase: Callable[[str], None] = lambda _: None) -> Path:
    """Write the package; the destination appears only once every file is complete."""
    opts = opts.resolved()
    out = opts.out.resolve()
    if out.parent.is_dir():
        _remove_stale_partials(out)
    if out.exists() and not opts.overwrite:
        raise MobilizeError(f"{out} already exists; pass --overwrite to replace it")
    recipe = recipe_named(opts.quant)
    if opts.format not in recipe.formats:
        raise MobilizeError(
            f"recipe {recipe.name!r} has no {opts.format} form (it is for: {', '.join(recipe.formats)})"
        )
    phase("reading checkpoint")
    ckpt = open_checkpoint(opts.source, opts.random_weights)
    tokenizer_ready = convert_in_background(ckpt)
    model = load_model(ckpt)
    needs_statistics = recipe.needs_statistics(opts.format) and has_tokenizer_json(ckpt)
    max_seq_len = opts.kv_length(model.config.max_position_embeddings)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))

    def tokenizer() -> list[str]:
        phase("writing tokenizer")
        tokenizer_ready()  # the conversion started above, if one was needed
        return write_tokenizer(model.ckpt, tmp)

    meanwhile = None
    try:
        statistics, calibration = None, {"used": False, "why": f"recipe {recipe.name} rounds to nearest"}
        tokenizer_files = None  # written last, unless calibration needs it to tokenize its text
        if recipe.needs_statistics(opts.format) and not needs_statistics:
            calibration["why"] = "the source has no tokenizer.json: rounded to nearest"
        elif needs_statistics and opts.format == "onnx":
            # ONNX weights are quantized as they are written, those that use the statistics last: calibrate in
            # a child process meanwhile (a split head only ranks channels: a shorter text does)
            max_tokens = None if "onnx" in recipe.calibrate else RANKING_TOKENS
            meanwhile = CalibrationInBackground(opts.source, opts.random_weights, max_tokens)

            @functools.cache
            def calibrated() -> tuple[dict[str, np.ndarray], dict]:
                if (result := meanwhile.result()) is not None:
                    return result
                tokenizer_ready()  # the child failed: calibrate here (a conversion's error reported in one line)
                return calibrate(model, ensure_tokenizer_json(model.ckpt), max_tokens)

            statistics = lambda: calibrated()[0]  # noqa: E731

        elif needs_statistics:
            tokenizer_files = tokenizer()
            phase("calibrating")
            computed, calibration = calibrate(model, tmp / "tokenizer.json")
            statistics = lambda: computed  # noqa: E731
        if opts.format == "tflite":
            phase("lowering to TFLite")
            stats = None if statistics is None else statistics()
            tfl, quant_report = build_tflite(model, recipe, max_seq_len, list(opts.prefill_lens), stats)
        else:
            passes = onnx_passes(recipe, max_seq_len, opts.opset, statistics)
            phase("building graph")
            graph = build_decoder(model, last_logits=opts.logits == "last")
            phase(f"passes ({recipe.name})")
            reports = run_passes(graph, passes)
            kv = static_kv(graph)
        config = dataclasses.asdict(model.config)
        target = {"name": opts.target, "max_seq_len": max_seq_len}
        if opts.format == "tflite":
            phase("writing model.tflite (weights streamed)")
            tfl.write(tmp / "model.tflite")
            io = tflite_io(tmp / "model.tflite")
            kv = tflite_kv(model.config, max_seq_len)
            reports = [{"pass": "tflite_lowering", "signatures": sorted(io["signatures"]), **quant_report}]
            target["prefill_lens"] = sorted(int(k.split("_")[1]) for k in io["signatures"] if k != "decode")
        else:
            phase("writing model.onnx (weights streamed)")
            save_onnx(graph, tmp)
            reports = summarize(reports)  # the quantization statistics came with the write
            if meanwhile is not None:  # (had no weight asked for them, the manifest still says what was done)
                calibration = calibrated()[1]
            io = graph_io(graph)
            target["opset"] = opts.opset
            target["logits"] = opts.logits
        if tokenizer_files is None:
            tokenizer_files = tokenizer()
        if opts.bundle == "litertlm":
            phase("writing model.litertlm")
            ids = special_token_ids(model.ckpt)
            eos = ids["eos_token_id"]
            eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
            info = {"architecture": config, "target": target}
            write_litertlm(tmp, info, ids["bos_token_id"], eos, tmp / "model.litertlm")
        if opts.format == "onnx":
            genai = genai_config(config, special_token_ids(model.ckpt), io, kv)
            (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2, sort_keys=True) + "\n")
        phase("writing manifest")
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "mobilize_version": __version__,
            "source": {"id": model.ckpt.source, "format": model.ckpt.format},
            "architecture": config,
            "format": opts.format,
            "recipe": {"name": recipe.name, "description": recipe.description},
            "build_report": {"calibration": calibration, "passes": reports},
            "target": target,
            "kv_cache": kv or {"layout": "dynamic"},
            "io": io,
            "tokenizer": tokenizer_files or None,
        }
        device = PRESETS[opts.target].device
        if device is not None:
            manifest["fit"] = fit(tmp, manifest, device)
        (tmp / "README.md").write_text(package_readme(manifest, sorted(p.name for p in tmp.iterdir())))
        manifest["files"] = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a package is for handing over
        _install(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MobilizeError(f"could not write the package to {out.parent}: {_write_error(e)}; nothing was left") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if meanwhile is not None:
            meanwhile.stop()
    return out


def _write_error(e: OSError) -> str:
    text = str(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "free space" in text or "written" in text:
        # numpy's tofile reports a short write without an errno ("N requested and M written")
        return f"the disk is full or a file-size limit was reached ({e.strerror or text})"
    return e.strerror or text


def _install(tmp: Path, out: Path) -> None:
    """Put the finished package at `out`. A previous package is moved aside first and deleted only once
    the new one is in place, so a kill at any moment leaves one whole package (old or new) or the old
    one beside the new, never a half-written one under the name."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(out: Path) -> None:
    """Temporary directories of exports that were killed: the pid in the name is no longer running."""
    remove_dead(out.parent, f".{out.name}.partial-*", "partial-")
