"""The export driver: source -> loaded model -> plain graph -> package directory, written atomically."""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mobilize import __version__
from mobilize.errors import MobilizeError
from mobilize.frontend.config import DecoderConfig
from mobilize.frontend.loader import load_model, open_checkpoint
from mobilize.frontend.lora import MAX_SLOT_RANK, Slots, apply_adapters, parse_targets
from mobilize.frontend.tokenizer import (
    check_tokenizer,
    convert_in_background,
    ensure_tokenizer_json,
    has_tokenizer_json,
    write_tokenizer,
)
from mobilize.manifest import MANIFEST, SIGNATURE, Architecture, FileEntry, Manifest, Recipe, Source, TargetRecord
from mobilize.package.adapter import write_empty_adapter
from mobilize.package.fit import describe, device_named, fit, predict
from mobilize.package.install import check_destination, destination, install, sweep
from mobilize.package.readme import package_readme
from mobilize.package.signing import load_signing_key, sign_manifest
from mobilize.partials import ACTIVE
from mobilize.quant.calibrate import RANKING_TOKENS, CalibrationInBackground, calibrate
from mobilize.quant.plan import (
    carried_exactly,
    estimate_weight_bytes,
    needs_statistics,
    searches_scales,
    smooths,
    unavailable,
)
from mobilize.quant.smooth import smooth
from mobilize.safe_io import fingerprint, quoted, sha256_file
from mobilize.targets import registry
from mobilize.targets.base import Lowering
from mobilize.targets.onnx.pipeline import OPSETS, recipe_named
from mobilize.targets.presets import PRESETS

LOGITS = ("last", "all")  # --logits: the ONNX logits output's positions
KV_DTYPES = ("float32", "float16")
MIN_PLANNED_CONTEXT = 512  # a preset's plan shortens the cache no further


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
    kv_dtype: str | None = None  # None: the preset's plan
    ignore_fit: bool = False  # write a package that does not fit the preset's device
    tokenizer_parity: bool = True  # the package's tokenizer against the runtime's own (GenAI's), at export
    sign: Path | None = None  # an OpenSSH private key: the manifest signed (manifest.json.sig)
    lora: tuple[str, ...] = ()  # PEFT adapter directories or GGUF LoRA files, merged before quantization
    lora_slots: int | None = None  # the rank of LoRA slots whose weights are given at run time
    lora_targets: str = "q,v"  # the projections that get slots

    def slots(self) -> Slots | None:
        if self.lora_slots is None:
            if self.lora_targets != "q,v":
                raise MobilizeError("--lora-targets names the projections of --lora-slots RANK; give that too")
            return None
        if not 1 <= self.lora_slots <= MAX_SLOT_RANK:
            raise MobilizeError(f"--lora-slots {self.lora_slots}: a rank from 1 to {MAX_SLOT_RANK}")
        return Slots(self.lora_slots, parse_targets(self.lora_targets))

    def resolved(self) -> ExportOptions:
        """Every choice the target leaves to its preset filled in; errors for unknown names."""
        if self.target not in PRESETS:
            raise MobilizeError(f"unknown target {self.target!r} (known: {', '.join(PRESETS)})")
        preset = PRESETS[self.target]
        fmt = self.format or preset.format
        if fmt not in registry.TARGETS:
            raise MobilizeError(f"format {fmt!r} is not available (known: {', '.join(registry.TARGETS)})")
        if self.opset not in OPSETS:
            raise MobilizeError(f"unknown --opset {self.opset!r} (known: {', '.join(OPSETS)})")
        if self.bundle not in (None, "litertlm"):
            raise MobilizeError(f"unknown --bundle {self.bundle!r} (known: litertlm)")
        if self.logits not in LOGITS:
            raise MobilizeError(f"unknown --logits {self.logits!r} (known: {', '.join(LOGITS)})")
        how = Lowering(0, self.opset, self.logits, self.prefill_lens, self.bundle, lora_slots=self.slots())
        registry.target(fmt).check(how)
        if not self.prefill_lens or any(not 1 <= n <= 1 << 16 for n in self.prefill_lens):
            raise MobilizeError(f"--prefill-len {list(self.prefill_lens)[:8]}: each must be from 1 to {1 << 16}")
        if len(self.prefill_lens) > 16:
            raise MobilizeError(f"--prefill-len given {len(self.prefill_lens)} times; at most 16 prefills")
        if self.kv_dtype not in (None, *KV_DTYPES):
            raise MobilizeError(f"unknown --kv-dtype {self.kv_dtype!r} (known: {', '.join(KV_DTYPES)})")
        if self.max_seq_len is not None and not 1 <= self.max_seq_len <= 1 << 20:
            raise MobilizeError(f"--max-seq-len {self.max_seq_len} is out of range (1..{1 << 20})")
        return dataclasses.replace(self, quant=self.quant or preset.quant, format=fmt)

    def kv_length(self, cfg: DecoderConfig) -> int:
        """--max-seq-len if given (it may not pass the model's context), else the preset's, capped by it."""
        context, why = cfg.static_context
        if self.max_seq_len is None:
            return min(PRESETS[self.target].max_seq_len, context)
        if self.max_seq_len > context:
            raise MobilizeError(f"--max-seq-len {self.max_seq_len} is past the model's context of {context}{why}")
        return self.max_seq_len


def export(opts: ExportOptions, phase: Callable[[str], None] = lambda _: None) -> Path:
    """Write the package; the destination appears only once every file is complete."""
    opts = opts.resolved()
    out = destination(opts.out)
    if out.parent.is_dir():
        sweep(out)
    check_destination(out, opts.overwrite, [opts.source] if os.path.lexists(opts.source) else [])
    signer = load_signing_key(opts.sign) if opts.sign is not None else None
    recipe = recipe_named(opts.quant)
    why = unavailable(recipe, registry.target(opts.format).caps)
    if why is not None:
        raise MobilizeError(f"recipe {recipe.name!r} has no {opts.format} form: {why}")
    phase("reading checkpoint")
    ckpt = open_checkpoint(opts.source, opts.random_weights)
    sources = ckpt.files + ([opts.source] if os.path.lexists(opts.source) else []) + list(opts.lora)
    check_destination(out, opts.overwrite, sources)  # (an alias's files are known only now)
    # A package with adapters merged is planned as its base is: calibrated, its carried weights chosen and its
    # inputs smoothed on the base, so it shares every tensor the adapters do not touch with the base's package
    # (tests/test_lora.py; docs/lora.md)
    base = load_model(ckpt)
    model, adapters = apply_adapters(base, list(opts.lora)) if opts.lora else (base, [])
    read = ckpt.files + [str(f) for a in adapters for f in a.files]
    read_state = fingerprint(read)
    tokenizer_ready = convert_in_background(ckpt)
    _check_memory(model)
    target = registry.target(opts.format)
    wants_statistics = needs_statistics(recipe, target.caps)
    calibrating = wants_statistics and has_tokenizer_json(ckpt)
    max_seq_len, kv_dtype, plan = plan_cache(opts, model, recipe, target, calibrating)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    ACTIVE.add(str(tmp))

    def tokenizer() -> list[str]:
        phase("writing tokenizer")
        tokenizer_ready()  # the conversion started above, if one was needed
        written = write_tokenizer(model.ckpt, tmp)
        check_tokenizer(model.ckpt, model.config.vocab_size, tmp)
        return written

    slots = opts.slots()
    how = Lowering(max_seq_len, opts.opset, opts.logits, opts.prefill_lens, opts.bundle, kv_dtype, slots)
    meanwhile = None
    try:
        smoothing = smooths(recipe, target.caps)  # (it needs the statistics before the weights: no lazy calibration)
        statistics, calibration = None, {"used": False, "why": f"recipe {recipe.name} rounds to nearest"}
        tokenizer_files = None  # written last, unless calibration needs it to tokenize its text
        if wants_statistics and not calibrating:
            calibration["why"] = "the source has no tokenizer.json: rounded to nearest" + (
                ", inputs not smoothed" if smoothing else ""
            )
        elif calibrating and target.lazy_statistics and not smoothing:
            # The weights that use the statistics are quantized last, as they are written: calibrate in a child
            # process meanwhile (a split head only ranks channels: a shorter text does)
            max_tokens = None if searches_scales(recipe, target.caps) else RANKING_TOKENS
            meanwhile = CalibrationInBackground(opts.source, opts.random_weights, max_tokens)

            @functools.cache
            def calibrated() -> tuple[dict[str, np.ndarray], dict]:
                if (result := meanwhile.result()) is not None:
                    return result
                tokenizer_ready()  # the child failed: calibrate here (a conversion's error reported in one line)
                return calibrate(base, ensure_tokenizer_json(model.ckpt), max_tokens)

            statistics = lambda: calibrated()[0]  # noqa: E731

        elif calibrating:
            tokenizer_files = tokenizer()
            phase("calibrating")
            computed, calibration = calibrate(base, tmp / "tokenizer.json")
            if smoothing:  # (lazily: a layer's weights read for its factors, then as written)
                carried = carried_exactly(base, recipe, target.caps)  # (those stay on their grid, unsmoothed)
                model, computed, smoothed = smooth(model, computed, recipe.smooth_alpha, carried, measured_on=base)
                model = dataclasses.replace(model, smoothing=smoothed)
                calibration = {**calibration, "smoothing": smoothed.record()}
            statistics = lambda: computed  # noqa: E731
        lowered = target.lower(model, recipe, how, statistics, phase)
        written = target.write(lowered, model, how, tmp, phase)
        if meanwhile is not None:  # (had no weight asked for them, the manifest still says what was done)
            calibration = calibrated()[1]
        if tokenizer_files is None:
            tokenizer_files = tokenizer()
        if adapters and calibration.get("used"):
            calibration = {**calibration, "model": "the base, without the adapters merged (as its own package)"}
        manifest = Manifest(
            mobilize_version=__version__,
            source=Source(model.ckpt.source, model.ckpt.format, tuple(a.record() for a in adapters)),
            architecture=Architecture.of(dataclasses.asdict(model.config)),
            format=opts.format,
            recipe=Recipe(recipe.name, recipe.description),
            build_report={"calibration": calibration, "passes": written.reports},
            target=TargetRecord(opts.target, max_seq_len, _threads(opts.target), written.lowering, **plan),
            kv_cache=written.kv_cache,
            io=written.io,
            tokenizer=tuple(tokenizer_files or ()) or None,
            lora_slots=None if slots is None else slots.record(model.config),
        )
        target.finish(model, manifest, how, tmp, phase)
        digest = functools.cache(sha256_file)  # each file hashed once: the empty adapter's base, the manifest
        write_empty_adapter(tmp, manifest, digest)
        if tokenizer_files and opts.tokenizer_parity:
            phase("checking the tokenizer against the runtime's")
            manifest = manifest.replace(tokenizer_parity=target.check_tokenizer(tmp))
        elif tokenizer_files:
            manifest = manifest.replace(tokenizer_parity={"skipped": "--ignore-tokenizer-parity"})
        phase("writing manifest")
        device = PRESETS[opts.target].device
        if device is not None:
            manifest = manifest.replace(fit=fit(tmp, manifest, device))
            if not manifest.fit["memory"]["fits"] and not opts.ignore_fit:
                raise MobilizeError(f"the package would not fit: {describe(manifest.fit)}; nothing was written "
                                    "(--ignore-fit writes it anyway)")  # fmt: skip
        (tmp / "README.md").write_text(package_readme(manifest, sorted(p.name for p in tmp.iterdir())))
        files = {p.name: FileEntry(p.stat().st_size, digest(p)) for p in sorted(tmp.iterdir())}
        manifest = manifest.replace(files=files)
        (tmp / MANIFEST).write_text(manifest.text())
        if signer is not None:
            (tmp / SIGNATURE).write_bytes(sign_manifest(signer, (tmp / MANIFEST).read_bytes()))
        tmp.chmod(0o755)  # mkdtemp makes it private; a package is for handing over
        if fingerprint(read) != read_state:
            raise MobilizeError(f"{quoted(opts.source)} changed while it was read; nothing was written")
        install(tmp, out, opts.overwrite, sources)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MobilizeError(
            f"could not write the package to {quoted(out.parent)}: {_write_error(e)}; nothing was left"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ACTIVE.discard(str(tmp))
        if meanwhile is not None:
            meanwhile.stop()
    return out


def plan_cache(opts: ExportOptions, model, recipe, target, calibrating: bool = True) -> tuple[int, str, dict]:
    """The KV cache's length and dtype: the options' where given, else the longest (from the preset's, halving down
    to MIN_PLANNED_CONTEXT) and, at that length, the first of the target's dtypes whose package fits the preset's
    device, predicted from the planned weights before any is written. Nothing fits: one error with the numbers,
    unless --ignore-fit (then the preset's own choice)."""
    preset = PRESETS[opts.target]
    cfg = model.config
    longest = opts.kv_length(cfg)
    lengths = [longest]
    if opts.max_seq_len is None:
        while lengths[-1] // 2 >= MIN_PLANNED_CONTEXT:
            lengths.append(lengths[-1] // 2)
    dtypes = [opts.kv_dtype] if opts.kv_dtype else list(target.kv_dtypes)
    if preset.device is None:
        return longest, dtypes[0], {}
    dev = device_named(preset.device)
    weights, per_token = estimate_weight_bytes(model, recipe, target.caps, calibrating)
    arch = Architecture.of(dataclasses.asdict(cfg))
    tried = []
    for length in lengths:
        for dtype in dtypes:
            kv = target.kv_cache_bytes(cfg, length, dtype)
            fields = {"logits": opts.logits, "prefill_lens": list(opts.prefill_lens)}
            activations = target.activation_bytes(arch, TargetRecord(opts.target, length, 0, fields), dtype, 128)
            r = predict(dev, weights, per_token, kv, target.kv_read_bytes(kv, dtype), activations)
            tried.append((length, dtype, r))
            if r["memory"]["fits"]:
                return length, dtype, {"kv_dtype": dtype, "plan": _plan_record(preset, tried)}
    if opts.ignore_fit:
        return longest, dtypes[0], {"kv_dtype": dtypes[0], "plan": _plan_record(preset, tried[:1])}
    length, dtype, r = tried[-1]
    raise MobilizeError(
        f"{opts.source} does not fit a {dev.name} as a {opts.target} package even with a {dtype} KV cache of {length} "
        f"positions: {describe(r)} (predicted). Pass --ignore-fit to write it anyway, or a smaller --quant"
    )


def _plan_record(preset, tried) -> dict:
    """What the preset's plan chose and what it passed over, for the manifest."""
    length, dtype, r = tried[-1]
    return {
        "device": preset.device,
        "chose": {"max_seq_len": length, "kv_dtype": dtype, "predicted_fit": r["memory"]["fits"]},
        "passed_over": [
            {"max_seq_len": n, "kv_dtype": d, "predicted_total_bytes": p["memory"]["total_bytes"]}
            for n, d, p in tried[:-1]
        ],
        "budget_bytes": r["memory"]["budget_bytes"],
    }


def _threads(target: str) -> int:
    """The intra-op threads a package asks its runtime for: its preset's device's big cores, or for a host
    package the cores this process may use (ONNX Runtime's own default counts physical cores, and leaves one of
    two single-thread cores idle)."""
    threads = PRESETS[target].threads
    if threads is not None:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_memory(model) -> None:
    """Weights are read and written one tensor at a time; one that cannot fit this machine's memory in float32
    would be killed by the kernel, with no message: refused before anything is read."""
    largest = max((4 * int(np.prod(ref.shape, dtype=np.int64)) for ref in model.weights.values()), default=0)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if largest > physical // 2:
        raise MobilizeError(
            f"one tensor of this model needs {largest / 2**30:,.1f} GiB as float32; this machine has "
            f"{physical / 2**30:,.1f} GiB of memory"
        )


def _write_error(e: OSError) -> str:
    text = str(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "free space" in text or "written" in text:
        # numpy's tofile reports a short write without an errno ("N requested and M written")
        return f"the disk is full or a file-size limit was reached ({e.strerror or text})"
    return e.strerror or text
