"""ONNX Runtime GenAI decode speed of a package as shipped (its genai_config.json's threads) against thread
overlays, in interleaved rounds, medians: `python -m mobilize.bench.genai_threads PACKAGE [--rounds 5]`."""

from __future__ import annotations

import argparse
import json
import statistics
import time


def decode_tok_s(package: str, threads: int | None, new_tokens: int = 64) -> float:
    import onnxruntime_genai as og

    config = og.Config(package)
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    with open(f"{package}/genai_config.json") as f:
        max_length = json.load(f)["search"]["max_length"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("The capital of France is"))
    generator.generate_next_token()  # the prompt: not timed
    start, n = time.perf_counter(), 0
    while n < new_tokens and not generator.is_done():
        generator.generate_next_token()
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("package")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2, 4])
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"shipped": [], **{str(t): [] for t in args.threads}}
    for _ in range(args.rounds):  # interleaved: a machine's drift hits every setting alike
        for key in runs:
            runs[key].append(decode_tok_s(args.package, None if key == "shipped" else int(key)))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    best = max(v for k, v in medians.items() if k != "shipped")
    print(json.dumps({"decode_tok_s": runs, "medians": medians, "shipped_vs_best_overlay": medians["shipped"] / best},
                     indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
