"""Benchmark: mobilize's int4 ONNX package of Gemma 3 270M against ONNX Runtime GenAI's own model builder
(int4, cpu) on the same checkpoint, measured in one run on this machine.

    python -m mobilize.bench.onnx_vs_genai_builder [--threads 2] [--rounds 10] [--json FILE]

Export: wall time and peak RSS of each tool in its own child process, medians of `--export-rounds` runs
each (ours from an empty cache, then again warm; the builder from a fresh cache), alternating which goes
first. Speed: both packages run by ONNX Runtime GenAI (the runtime an app embeds), rounds interleaved
(A B, B A, ...) so drift hits both alike; medians of time to first token, prefill and decode tokens/s,
and the speed ratios also round by round (the median of each round's ratio: on a shared machine a round's
load moves both together).
Accuracy: perplexity on a plain English text (bench/data/river.txt, written for this project) through
onnxruntime with full logits, against the reference model (transformers, fp32, on the same GGUF).
Targets (issue 3): decode and prefill >= the builder's, export time and peak RSS <= 0.5x, perplexity
within +5% of the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from mobilize.bench.peers.genai_builder import FLAT_ROPE_NOTE, build, hf_dir_from_gguf, timed_child
from mobilize.harness.perf import paired_ratio

TEXT = Path(__file__).parent / "data" / "river.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds after one warm-up each")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--export-rounds", type=int, default=3, help="exports of each tool, alternating; medians")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--workdir", type=Path, default=Path("out/bench-vs-genai-builder"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.export_rounds < 1 or args.rounds < 1:
        ap.error("--rounds and --export-rounds must be at least 1")

    from mobilize.frontend.sources.aliases import bundled_gguf

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    gguf = bundled_gguf()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    log("export: the genai builder's input written once from the GGUF by transformers (untimed)")
    hf_dir = hf_dir_from_gguf(gguf, work / "gemma3-270m-hf")
    ours_dir, peer_dir = work / f"mobilize-{args.quant}", work / "genai-builder-int4"
    cmd = [
        sys.executable, "-m", "mobilize.cli", "export", str(gguf), "--target", "android",
        "--quant", args.quant, "--out", str(ours_dir), "--overwrite",
    ]  # fmt: skip
    runs: dict[str, list[dict]] = {"mobilize": [], "mobilize_warm_cache": [], "genai_builder": []}
    for i in range(args.export_rounds):
        log(f"export round {i + 1}/{args.export_rounds}: mobilize cold (empty cache: the tokenizer is converted) "
            "and warm, the genai builder (fresh cache), in alternating order")  # fmt: skip
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "MOBILIZE_CACHE": cache}

            def ours(env=env) -> None:
                runs["mobilize"].append(timed_child(cmd, env=env))
                runs["mobilize_warm_cache"].append(timed_child(cmd, env=env))

            def peer(cache=Path(cache)) -> None:
                runs["genai_builder"].append(build(hf_dir, peer_dir, cache / "builder-cache"))

            for step in (ours, peer) if i % 2 == 0 else (peer, ours):
                step()
    export = {name: _median_run(r) for name, r in runs.items()}
    ours_export, peer_export = export["mobilize"], export["genai_builder"]

    log("speed: both packages in ONNX Runtime GenAI, interleaved rounds")
    speed = _speed({"mobilize": ours_dir, "genai_builder": peer_dir}, args)
    log("accuracy: perplexity (reference: transformers fp32 on the GGUF)")
    ppl = _perplexity(gguf, {"mobilize": ours_dir, "genai_builder": peer_dir})

    result = {
        "model": "gemma3-270m (bundled Q4_K_M GGUF)",
        "quant": args.quant,
        "threads": args.threads,
        "note": FLAT_ROPE_NOTE,
        "export": export,
        "speed": speed,
        "perplexity": ppl,
    }
    result["ratios"] = {
        "decode_tok_s (ours / builder, target >= 1)": speed["mobilize"]["decode_tok_s"]
        / speed["genai_builder"]["decode_tok_s"],
        "prefill_tok_s (ours / builder, target >= 1)": speed["mobilize"]["prefill_tok_s"]
        / speed["genai_builder"]["prefill_tok_s"],
        "export_wall (ours / builder, target <= 0.5)": ours_export["wall_s"] / peer_export["wall_s"],
        "export_peak_rss (ours / builder, target <= 0.5)": ours_export["peak_rss_bytes"]
        / peer_export["peak_rss_bytes"],
        "export_wall, round by round (median of per-round ratios)": paired_ratio(
            ours_export["samples"]["wall_s"], peer_export["samples"]["wall_s"]
        ),
        "decode_tok_s, round by round (median of per-round ratios)": paired_ratio(
            speed["mobilize"]["samples"]["tg"], speed["genai_builder"]["samples"]["tg"]
        ),
        "prefill_tok_s, round by round (median of per-round ratios)": paired_ratio(
            speed["mobilize"]["samples"]["pp"], speed["genai_builder"]["samples"]["pp"]
        ),
        "perplexity (ours / reference, target <= 1.05)": ppl["mobilize"] / ppl["reference"],
        "perplexity (builder / reference)": ppl["genai_builder"] / ppl["reference"],
    }
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _median_run(runs: list[dict]) -> dict:
    """Medians of one tool's export runs (wall seconds, peak RSS), with the samples in round order."""
    keys = ("wall_s", "peak_rss_bytes")
    samples = {k: [r[k] for r in runs] for k in keys}
    return {k: statistics.median(v) for k, v in samples.items()} | {"samples": samples}


def _speed(packages: dict[str, Path], args) -> dict:
    from mobilize.harness.perf import interleaved, measure
    from mobilize.targets.onnx.genai_runner import GenAIRunner

    runners = {name: GenAIRunner(path, args.threads) for name, path in packages.items()}
    return interleaved(
        {
            name: (lambda r=r: measure(r, 262144, args.prompt_len, args.gen_len, repeats=1))
            for name, r in runners.items()
        },
        args.rounds,
    )


def _perplexity(gguf: Path, packages: dict[str, Path]) -> dict:
    from tokenizers import Tokenizer

    from mobilize.harness.accuracy import perplexity
    from mobilize.harness.reference import ReferenceRunner
    from mobilize.targets.onnx.runner import OrtRunner

    ids = Tokenizer.from_file(str(packages["mobilize"] / "tokenizer.json")).encode(TEXT.read_text()).ids
    out = {"tokens": len(ids), "reference": perplexity(ReferenceRunner.for_path(gguf), ids, chunk=len(ids))}
    for name, path in packages.items():
        out[name] = perplexity(OrtRunner(path / "model.onnx", threads=2), ids, chunk=len(ids))
    return out


def _print(r: dict) -> None:
    print(f"gemma3-270m, {r['threads']} threads   ({r['note']})")
    print(f"{'':22}{'export s':>10}{'peak RSS':>10}{'TTFT ms':>9}{'pp tok/s':>10}{'tg tok/s':>10}{'ppl':>8}")
    for name in ("mobilize", "mobilize_warm_cache", "genai_builder"):
        e = r["export"][name]
        row = f"{name:22}{e['wall_s']:10.1f}{e['peak_rss_bytes'] / 2**30:9.2f}G"
        if name in r["speed"]:
            s = r["speed"][name]
            row += f"{s['time_to_first_token_s'] * 1000:9.0f}{s['prefill_tok_s']:10.1f}{s['decode_tok_s']:10.1f}"
            row += f"{r['perplexity'][name]:8.2f}"
        print(row)
    print(f"{'reference fp32':22}{'':49}{r['perplexity']['reference']:8.2f}   ({r['perplexity']['tokens']} tokens)")
    for k, v in r["ratios"].items():
        print(f"  {k:50} {v:.2f}")


if __name__ == "__main__":
    sys.exit(main())
