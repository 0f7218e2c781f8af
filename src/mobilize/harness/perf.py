"""Token-rate measurement of a runner: time to first token, prefill and decode tokens/s, peak RSS.

Each measurement is repeated after a warm-up; the medians are reported, with the samples, in records
shaped like llama-bench's (test, n_tokens, avg_ts, stddev_ts, samples_ts)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mobilize.harness.runner import Runner


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def measure(runner: Runner, vocab_size: int, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3) -> dict:
    """Prefill `prompt_len` tokens, then decode `gen_len` greedily; `repeats` timed runs after one warm-up."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab_size, size=prompt_len).tolist()
    prefill_s, decode_s = [], []
    for i in range(repeats + 1):
        runner.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(runner.prefill(prompt)[-1]))
        t1 = time.perf_counter()
        for _ in range(gen_len):
            token = int(np.argmax(runner.decode(token)))
        t2 = time.perf_counter()
        if i:  # the first run is the warm-up
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    return summarize(prompt_len, gen_len, prefill_s, prefill_s, decode_s)


def measure_engine(run: Callable[[], tuple[float, float, float]], prompt_len: int, gen_len: int, repeats: int) -> dict:
    """`repeats` runs of an engine that times itself (`run`: one run's time to first token, prefill and decode
    seconds), after one warm-up run; medians."""
    ttft, prefill_s, decode_s = [], [], []
    for i in range(repeats + 1):
        first, prefill, decode = run()
        if i:
            ttft.append(first)
            prefill_s.append(prefill)
            decode_s.append(decode)
    return summarize(prompt_len, gen_len, ttft, prefill_s, decode_s)


def summarize(
    prompt_len: int, gen_len: int, ttft_s: list[float], prefill_s: list[float], decode_s: list[float]
) -> dict:
    """The result of timed runs (seconds per run): medians, llama-bench-like records, peak RSS."""
    records = [_record(f"pp{prompt_len}", prompt_len, prefill_s), _record(f"tg{gen_len}", gen_len, decode_s)]
    return {
        "time_to_first_token_s": statistics.median(ttft_s),
        "prefill_tokens_per_s": records[0]["avg_ts"],
        "decode_tokens_per_s": records[1]["avg_ts"],
        "peak_rss_bytes": peak_rss_bytes(),
        "records": records,
    }


def interleaved(measurers: dict[str, Callable[[], dict]], rounds: int) -> dict[str, dict]:
    """One measurement of each contender per round, rounds interleaved so drift on a shared machine hits
    all alike, and every other round in reverse order (A B, B A, ...) so no contender always runs right
    after another; per contender the medians over rounds, with the samples (in round order)."""
    samples = {name: {"ttft": [], "pp": [], "tg": []} for name in measurers}
    names = list(measurers)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            m = measurers[name]()
            samples[name]["ttft"].append(m["time_to_first_token_s"])
            samples[name]["pp"].append(m["prefill_tokens_per_s"])
            samples[name]["tg"].append(m["decode_tokens_per_s"])
    return {
        name: {
            "time_to_first_token_s": statistics.median(s["ttft"]),
            "prefill_tok_s": statistics.median(s["pp"]),
            "decode_tok_s": statistics.median(s["tg"]),
            "samples": s,
        }
        for name, s in samples.items()
    }


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a[i] / b[i]: two contenders' samples from the same rounds compared round
    by round, so what moved the whole machine in a round cancels."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _record(test: str, n_tokens: int, seconds: list[float]) -> dict[str, Any]:
    rates = [n_tokens / s for s in seconds]
    return {
        "test": test,
        "n_tokens": n_tokens,
        "avg_ts": statistics.median(rates),
        "stddev_ts": statistics.stdev(rates) if len(rates) > 1 else 0.0,
        "samples_ts": rates,
    }
