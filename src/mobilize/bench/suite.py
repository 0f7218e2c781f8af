"""Benchmark suites as data (bench/suites/*.toml), run into one results JSON, compared against a baseline.

A suite names cases (model x format x recipe; a list in a field expands to one case per value) and the
measurement settings. Each case is exported in a child process (wall time and peak RSS of the export),
then measured here: prefill and decode tokens/s (perf.measure: warm-up, repeats, medians), perplexity on
the first `text_tokens` of bench/data/river.txt, and the package's bytes. `compare` reads two results
files and fails on any metric worse than its tolerance; `plot` draws them.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError
from mobilize.safe_io import quoted, read_bytes, read_json

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SUITES = Path(__file__).parent / "suites"
TEXT = Path(__file__).parent / "data" / "river.txt"
# Each metric and whether more is better.
METRICS = {
    "prefill_tok_s": True,
    "decode_tok_s": True,
    "ppl": False,
    "package_bytes": False,
    "export_s": False,
    "export_peak_rss_bytes": False,
}


def load_suite(spec: str | Path) -> dict[str, Any]:
    """A suite by name (bench/suites/<name>.toml) or path; its cases expanded."""
    path = Path(spec)
    if not os.path.lexists(path):
        path = SUITES / f"{spec}.toml"
    if not os.path.lexists(path):
        known = ", ".join(sorted(p.stem for p in SUITES.glob("*.toml")))
        raise MobilizeError(f"no suite {spec!r} (a .toml file, or one of: {known})")
    try:
        suite = tomllib.loads(read_bytes(path, 1 << 20, follow=True).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MobilizeError(f"{quoted(path)}: not a valid suite ({type(e).__name__})") from None
    cases = []
    for raw in suite.get("case", []):
        if "model" not in raw:
            raise MobilizeError(f"{path}: a case without a model")
        axes = {k: v if isinstance(v, list) and k != "prefill_len" else [v] for k, v in raw.items()}
        for values in itertools.product(*axes.values()):
            case = dict(zip(axes, values, strict=True))
            case.setdefault("format", "onnx")
            case.setdefault("quant", "int4")
            model = str(case["model"])
            name = Path(model).name if Path(model).exists() else model  # an alias may hold dots (llama-3.2-1b)
            case["id"] = f"{name}/{case['format']}/{case['quant']}"
            cases.append(case)
    if not cases:
        raise MobilizeError(f"{path}: no cases")
    suite["case"] = cases
    suite.setdefault("name", path.stem)
    return suite


def run_suite(suite: dict[str, Any], work: Path, log=lambda msg: None) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from mobilize.bench.peers.genai_builder import timed_child
    from mobilize.harness.accuracy import perplexity
    from mobilize.harness.package import Package
    from mobilize.harness.perf import measure

    threads, repeats = suite.get("threads", 2), suite.get("repeats", 3)
    prompt_len, gen_len = suite.get("prompt_len", 128), suite.get("gen_len", 64)
    results = []
    for case in suite["case"]:
        log(f"{case['id']}: export")
        out = work / case["id"].replace("/", "-")
        cmd = [sys.executable, "-m", "mobilize.cli", "export", str(case["model"]), "--format", case["format"],
               "--quant", case["quant"], "--out", str(out), "--overwrite"]  # fmt: skip
        if "max_seq_len" in case:
            cmd += ["--max-seq-len", str(case["max_seq_len"])]
        for n in case.get("prefill_len", []):
            cmd += ["--prefill-len", str(n)]
        if case.get("random_weights"):
            cmd.append("--random-weights")
        try:
            export = timed_child(cmd)
        except RuntimeError as e:
            raise MobilizeError(f"{case['id']}: the export failed: {str(e).strip().splitlines()[-1]}") from None
        export_metrics = {
            "package_bytes": sum(p.stat().st_size for p in out.iterdir()),
            "export_s": export["wall_s"],
            "export_peak_rss_bytes": export["peak_rss_bytes"],
        }
        if suite.get("measure", "all") == "export":  # export cost only (random weights: nothing to score)
            results.append({"id": case["id"], "case": case, "metrics": export_metrics})
            continue
        pkg = Package.open(out)
        log(f"{case['id']}: speed")
        speed = measure(pkg.runner(threads), pkg.manifest.architecture.vocab_size, prompt_len, gen_len, repeats)
        log(f"{case['id']}: perplexity")
        ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(TEXT.read_text()).ids[: suite.get("text_tokens")]
        metrics = {
            "prefill_tok_s": speed["prefill_tokens_per_s"],
            "decode_tok_s": speed["decode_tokens_per_s"],
            "ppl": perplexity(pkg.runner(threads), ids, chunk=len(ids)),
            **export_metrics,
        }
        results.append({"id": case["id"], "case": case, "metrics": metrics, "records": speed["records"]})
    return {
        "suite": suite["name"],
        "settings": {k: suite.get(k) for k in ("threads", "prompt_len", "gen_len", "repeats", "text_tokens")},
        "tolerance": suite.get("tolerance", {}),
        "results": results,
    }


def read_results(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path):
        raise MobilizeError(f"no results file {quoted(path)}")
    data = read_json(Path(path), 64 << 20, kind=object, follow=True)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise MobilizeError(f"{path} is not a results file of `mobilize bench run`")
    emulated = next((r for r in [data, *data["results"]] if isinstance(r, dict) and _emulated(r)), None)
    if emulated is not None:  # an emulated device's speed is its emulator's, not the device's
        raise MobilizeError(f"{path} holds results from an emulated device ({_emulated(emulated)}): they are never "
                            "compared or used as a baseline")  # fmt: skip
    return data


def _emulated(record: dict) -> str | None:
    device = record.get("device")
    return device.get("emulated") if isinstance(device, dict) else None


# What a different machine does not change: a baseline recorded elsewhere is compared on these alone.
MACHINE_INDEPENDENT = ("ppl", "package_bytes")


def compare(
    base: dict, new: dict, max_regression: float, tolerance: dict[str, float], metrics: tuple[str, ...] | None = None
) -> tuple[list[dict], bool]:
    """One row per (case, metric) present in both (of `metrics`, if given); `ok` False where a metric got worse
    by more than its tolerance (given, else the baseline file's, else `max_regression`)."""
    unknown = sorted(set(metrics or ()) - set(METRICS))
    if unknown:
        raise MobilizeError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    limits = {k: v / 100 for k, v in base.get("tolerance", {}).items()} | tolerance
    old = {r["id"]: r["metrics"] for r in base["results"]}
    rows, passed = [], True
    for r in new["results"]:
        if r["id"] not in old:
            continue
        for metric, higher_better in METRICS.items():
            if metrics is not None and metric not in metrics:
                continue
            a, b = old[r["id"]].get(metric), r["metrics"].get(metric)
            if a is None or b is None or a == 0:
                continue
            change = (b - a) / a
            worse = -change if higher_better else change
            limit = limits.get(metric, max_regression)
            ok = worse <= limit
            passed &= ok
            rows.append({"id": r["id"], "metric": metric, "base": a, "new": b, "change": change, "limit": limit,
                         "ok": ok})  # fmt: skip
    missing = sorted(set(old) - {r["id"] for r in new["results"]})
    if missing:
        rows.append({"id": missing[0], "metric": "missing from the new results", "ok": False})
        passed = False
    return rows, passed


def plot(results: dict, out: Path) -> list[Path]:
    """tokens/s per case (prefill and decode bars) and perplexity against package size, as PNGs."""
    from mobilize.optional import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = results["results"]
    names = [r["id"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["metrics"]["prefill_tok_s"] for r in rows], 0.4, label="prefill")
    ax.bar([i + 0.2 for i in x], [r["metrics"]["decode_tok_s"] for r in rows], 0.4, label="decode")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"suite {results['suite']}: tokens/s per case")
    ax.legend()
    fig.tight_layout()
    speed = out / f"{results['suite']}-tokens-per-s.png"
    fig.savefig(speed, dpi=100, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        size = r["metrics"]["package_bytes"] / 1e6
        ax.scatter(size, r["metrics"]["ppl"])
        ax.annotate(r["id"], (size, r["metrics"]["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("package size (MB)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"suite {results['suite']}: perplexity against size")
    fig.tight_layout()
    accuracy = out / f"{results['suite']}-perplexity-vs-size.png"
    fig.savefig(accuracy, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return [speed, accuracy]
