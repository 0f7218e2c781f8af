"""Benchmark: mobilize's LiteRT (TFLite) package of Gemma 3 270M against llama.cpp (llama-cpp-python) on
the same GGUF, measured in one run on this machine.

    python -m mobilize.bench.tflite_vs_llama_cpp [--threads 2] [--rounds 3] [--quant int4] [--json FILE]

Speed: our package in LiteRT-LM's engine (litert-lm-api: the C++ runtime an app embeds, on the
package's .litertlm bundle), in LiteRT's Python interpreter through mobilize's runner (the cache moved
by Python between calls), and llama.cpp through llama-cpp-python timed by the same harness
(perf.measure); rounds interleaved; medians of time to first token, prefill (128 tokens) and decode
(64 tokens) tokens/s. Accuracy: perplexity on
bench/data/river.txt with full logits, beside the reference model's (transformers fp32 on the GGUF)
and llama.cpp's own Q4_K_M. Targets (issue 4): prefill and decode >= llama.cpp's; perplexity within
+5% of the reference. Needs `pip install llama-cpp-python` (compiles llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mobilize.bench.peers.genai_builder import timed_child

TEXT = Path(__file__).parent / "data" / "river.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds after one warm-up each")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=Path("out/bench-tflite-vs-llama-cpp"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from mobilize.frontend.sources.aliases import bundled_gguf

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    gguf = bundled_gguf()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    log(f"export: mobilize tflite {args.quant}")
    ours = work / f"mobilize-tflite-{args.quant}"
    cmd = [
        sys.executable, "-m", "mobilize.cli", "export", str(gguf), "--target", "android", "--format",
        "tflite", "--quant", args.quant, "--max-seq-len", str(args.max_seq_len), "--bundle", "litertlm",
        "--out", str(ours), "--overwrite",
    ]  # fmt: skip
    export = timed_child(cmd)

    log("speed: interleaved rounds")
    speed = _speed(ours, gguf, args)
    log("accuracy: perplexity")
    ppl = _perplexity(ours, gguf, args.threads)
    result = {
        "model": "gemma3-270m (bundled Q4_K_M GGUF)",
        "threads": args.threads,
        "max_seq_len": args.max_seq_len,
        "quant": args.quant,
        "export": {"wall_s": export["wall_s"], "peak_rss_bytes": export["peak_rss_bytes"]},
        "package_bytes": (ours / "model.tflite").stat().st_size,
        "gguf_bytes": gguf.stat().st_size,
        "speed": speed,
        "perplexity": ppl,
    }
    result["ratios"] = {
        "prefill_tok_s (ours in LiteRT-LM / llama.cpp, target >= 1)": speed["mobilize_litert_lm"]["prefill_tok_s"]
        / speed["llama_cpp"]["prefill_tok_s"],
        "decode_tok_s (ours in LiteRT-LM / llama.cpp, target >= 1)": speed["mobilize_litert_lm"]["decode_tok_s"]
        / speed["llama_cpp"]["decode_tok_s"],
        "decode_tok_s (ours, Python LiteRT loop / llama.cpp)": speed["mobilize_litert_python"]["decode_tok_s"]
        / speed["llama_cpp"]["decode_tok_s"],
        "perplexity (ours / reference, target <= 1.05)": ppl["mobilize"] / ppl["reference"],
        "perplexity (llama.cpp / reference)": ppl["llama_cpp"] / ppl["reference"],
    }
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _speed(package: Path, gguf: Path, args) -> dict:
    from mobilize.bench.peers.llama_cpp import LlamaCppRunner
    from mobilize.harness.perf import interleaved, measure, measure_engine
    from mobilize.targets.tflite.litertlm_bench import run_litertlm
    from mobilize.targets.tflite.runner import LiteRtRunner

    python_loop = LiteRtRunner(package / "model.tflite", args.threads)
    llama = LlamaCppRunner(gguf, args.threads, n_ctx=args.max_seq_len)
    p, g = args.prompt_len, args.gen_len
    return interleaved(
        {
            "mobilize_litert_lm": lambda: measure_engine(
                lambda: run_litertlm(package / "model.litertlm", args.threads, p, g), p, g, 1
            ),
            "mobilize_litert_python": lambda: measure(python_loop, 262144, p, g, repeats=1),
            "llama_cpp": lambda: measure(llama, 262144, p, g, repeats=1),
        },
        args.rounds,
    )


def _perplexity(package: Path, gguf: Path, threads: int) -> dict:
    from tokenizers import Tokenizer

    from mobilize.bench.peers.llama_cpp import LlamaCppRunner
    from mobilize.harness.accuracy import perplexity
    from mobilize.harness.reference import ReferenceRunner
    from mobilize.targets.tflite.runner import LiteRtRunner

    ids = Tokenizer.from_file(str(package / "tokenizer.json")).encode(TEXT.read_text()).ids
    n = len(ids)
    return {
        "tokens": n,
        "reference": perplexity(ReferenceRunner.for_path(gguf), ids, chunk=n),
        "mobilize": perplexity(LiteRtRunner(package / "model.tflite", threads), ids, chunk=n),
        "llama_cpp": perplexity(LlamaCppRunner(gguf, threads, n_ctx=max(512, n), logits_all=True), ids, chunk=n),
    }


def _print(r: dict) -> None:
    e = r["export"]
    print(f"gemma3-270m, {r['threads']} threads, KV cache {r['max_seq_len']}, mobilize tflite {r['quant']}")
    print(f"export: {e['wall_s']:.1f} s, peak RSS {e['peak_rss_bytes'] / 2**30:.2f} GB, "
          f"model.tflite {r['package_bytes'] / 1e6:.0f} MB (the GGUF: {r['gguf_bytes'] / 1e6:.0f} MB)")  # fmt: skip
    print(f"{'':24}{'TTFT ms':>9}{'pp tok/s':>10}{'tg tok/s':>10}{'ppl':>8}")
    for name, ppl in (
        ("mobilize_litert_lm", "mobilize"),
        ("mobilize_litert_python", "mobilize"),
        ("llama_cpp", "llama_cpp"),
    ):
        s = r["speed"][name]
        print(
            f"{name:24}{s['time_to_first_token_s'] * 1000:9.0f}{s['prefill_tok_s']:10.1f}{s['decode_tok_s']:10.1f}"
            f"{r['perplexity'][ppl]:8.2f}"
        )
    print(f"{'reference fp32':24}{'':29}{r['perplexity']['reference']:8.2f}   ({r['perplexity']['tokens']} tokens)")
    for k, v in r["ratios"].items():
        print(f"  {k:50} {v:.2f}")


if __name__ == "__main__":
    sys.exit(main())
