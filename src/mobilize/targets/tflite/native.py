"""The native benchmark tools of the TFLite runtimes, run on a device without Python (`mobilize bench PACKAGE
--device adb:SERIAL --native PATH`): LiteRT's `benchmark_model` on the package's `model.tflite` (its `decode` and
a `prefill_<L>` signature timed apart) and LiteRT-LM's `litert_lm_main` on its `model.litertlm` (the engine's own
benchmark). Each gives (time to first token, prefill, decode seconds for the asked lengths, peak memory) per run,
read from the lines the tools print (their formats: LiteRT's tflite/tools/benchmark/benchmark_tflite_model.cc,
LiteRT-LM's runtime/engine/io_types.cc; labels changed between versions, so both spellings are read)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

from mobilize.errors import MobilizeError
from mobilize.manifest import Manifest

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Timing:
    ttft_s: float
    prefill_s: float  # for the asked prompt length
    decode_s: float  # for the asked number of new tokens
    peak_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class NativeTool:
    """`commands(manifest, threads, prompt_len, gen_len)` -> the argument lists of one run (relative paths: the
    package is `package/`); `timing(outputs, manifest, prompt_len, gen_len)` -> one run's Timing from what they
    printed (stdout and stderr)."""

    model_file: str
    missing: str  # what to do when the package has no `model_file`
    commands: Callable[[Manifest, int, int, int], list[list[str]]]
    timing: Callable[[list[str], Manifest, int, int], Timing]
    note: str


def _number(pattern: str, text: str, what: str) -> float:
    found = re.findall(pattern, text)
    if not found:
        raise MobilizeError(f"the tool printed no {what} (its last line: {_last(text)})")
    return float(found[-1])


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "nothing"


def _peak(text: str, pattern: str) -> int | None:
    found = re.findall(pattern, text)
    return int(float(found[-1]) * MIB) if found else None


# ---- LiteRT's benchmark_model: a signature at a time, random inputs (positions 0-99 and token ids 0-99) ----

_TIMINGS = r"Inference \(avg\):\s*([0-9.eE+-]+)"  # "Inference timings in us: Init: ..., Inference (avg): X"
_TFLITE_PEAK = r"Overall peak memory footprint \(MB\) via periodic monitoring:\s*([0-9.]+)"


def _prefill_signature(manifest: Manifest, prompt_len: int) -> int:
    from mobilize.targets.tflite.runner import prefill_lengths

    lens = prefill_lengths(manifest.io.signatures or {})
    if not lens:
        raise MobilizeError("the package's model.tflite has no prefill_<L> signature")
    return max((n for n in lens if n <= prompt_len), default=lens[0])


def _benchmark_model_commands(manifest: Manifest, threads: int, prompt_len: int, gen_len: int) -> list[list[str]]:
    n = threads or manifest.target.threads
    common = ["--graph=package/model.tflite", *([f"--num_threads={n}"] if n else []), "--warmup_runs=1",
              "--report_peak_memory_footprint=true"]  # fmt: skip
    length = _prefill_signature(manifest, prompt_len)
    runs = max(1, math.ceil(prompt_len / length))
    return [
        [*common, f"--signature_to_run_for=prefill_{length}", f"--num_runs={runs}"],
        [*common, "--signature_to_run_for=decode", f"--num_runs={gen_len}"],
    ]


def _benchmark_model_timing(outputs: list[str], manifest: Manifest, prompt_len: int, gen_len: int) -> Timing:
    prefill_us = _number(_TIMINGS, outputs[0], "inference timings for the prefill signature")
    decode_us = _number(_TIMINGS, outputs[1], "inference timings for the decode signature")
    # the prompt's prefill: as many calls of the signature as its length takes, each the signature's average
    prefill_s = prefill_us * 1e-6 * max(1, math.ceil(prompt_len / _prefill_signature(manifest, prompt_len)))
    peaks = [p for p in (_peak(o, _TFLITE_PEAK) for o in outputs) if p is not None]
    return Timing(prefill_s + decode_us * 1e-6, prefill_s, decode_us * 1e-6 * gen_len, max(peaks, default=None))


# ---- LiteRT-LM's litert_lm_main --benchmark: the engine's prefill and decode of dummy tokens ----

_LM_PREFILL = r"(?:Prefill Speed:|Prefill speed turn \d+:)\s*([0-9.]+)"  # tokens/sec | tk/s (--log_sink_file)
_LM_DECODE = r"(?:Decode Speed:|Decode speed turn \d+:)\s*([0-9.]+)"
_LM_TTFT = r"Time to first token:\s*([0-9.]+)\s*s"
_LM_PEAK = r"Peak (?:system ram usage|private footprint):\s*([0-9.]+)\s*MB"


def _litert_lm_commands(manifest: Manifest, threads: int, prompt_len: int, gen_len: int) -> list[list[str]]:
    n = threads or manifest.target.threads
    return [["--model_path=package/model.litertlm", "--backend=cpu", *([f"--num_cpu_threads={n}"] if n else []),
             "--benchmark",
             f"--benchmark_prefill_tokens={prompt_len}", f"--benchmark_decode_tokens={gen_len}", "--async=false",
             "--report_peak_memory_footprint=true"]]  # fmt: skip


def _litert_lm_timing(outputs: list[str], manifest: Manifest, prompt_len: int, gen_len: int) -> Timing:
    text = outputs[0]
    prefill = prompt_len / _number(_LM_PREFILL, text, "prefill speed")
    decode = gen_len / _number(_LM_DECODE, text, "decode speed")
    ttft = float(re.findall(_LM_TTFT, text)[-1]) if re.search(_LM_TTFT, text) else prefill + decode / gen_len
    return Timing(ttft, prefill, decode, _peak(text, _LM_PEAK))


TOOLS = {
    "benchmark_model": NativeTool(
        "model.tflite", "a TFLite package has one", _benchmark_model_commands, _benchmark_model_timing,
        "LiteRT's benchmark_model: the decode signature and one prefill signature timed apart on random inputs; "
        "prefill is that signature's time per call times the calls a prompt of this length takes",
    ),
    "litert_lm_main": NativeTool(
        "model.litertlm", "export it with --bundle litertlm", _litert_lm_commands, _litert_lm_timing,
        "LiteRT-LM's litert_lm_main --benchmark: the engine's prefill and decode of dummy tokens",
    ),
}  # fmt: skip
