"""Peers measured the way mobilize's packages are: `python -m mobilize.bench.peers [--peers ...] [--json FILE]`.

Each peer on the bundled Gemma 3 270M, 2 threads: time to first token, prefill and decode tokens/s
(perf.measure, medians), perplexity on bench/data/river.txt. llama.cpp needs `pip install
llama-cpp-python`; PyTorch eager needs the `reference` extra (torch). ONNX Runtime GenAI's builder has
its own benchmark (python -m mobilize.bench.onnx_vs_genai_builder), which exports with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEXT = Path(__file__).parent.parent / "data" / "river.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="llama_cpp,pytorch_eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    from mobilize import cache_root
    from mobilize.frontend.sources.aliases import bundled_gguf
    from mobilize.harness.accuracy import perplexity
    from mobilize.harness.perf import measure

    gguf = bundled_gguf()
    tokenizer = next((cache_root() / "tokenizers").glob("*/tokenizer.json"), None)
    ids = Tokenizer.from_file(str(tokenizer)).encode(TEXT.read_text()).ids if tokenizer else None
    out = {}
    for peer in args.peers.split(","):
        if peer == "llama_cpp":
            from mobilize.bench.peers.llama_cpp import LlamaCppRunner

            runner = LlamaCppRunner(gguf, args.threads)
            scorer = LlamaCppRunner(gguf, args.threads, n_ctx=1024, logits_all=True)
        elif peer == "pytorch_eager":
            from mobilize.bench.peers.pytorch_eager import pytorch_eager_runner

            runner = scorer = pytorch_eager_runner(gguf, args.threads)
        else:
            print(f"unknown peer {peer!r} (llama_cpp, pytorch_eager)", file=sys.stderr)
            return 1
        m = measure(runner, 262144, args.prompt_len, args.gen_len, args.repeats)
        m["ppl"] = perplexity(scorer, ids, chunk=len(ids)) if ids else None
        out[peer] = m
        ppl = f"{m['ppl']:.2f}" if m["ppl"] else "-"
        print(f"{peer:14} TTFT {m['time_to_first_token_s'] * 1000:6.0f} ms  pp {m['prefill_tokens_per_s']:7.1f}  "
              f"tg {m['decode_tokens_per_s']:6.1f} tok/s  ppl {ppl}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model": "gemma3-270m", "threads": args.threads, "peers": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
