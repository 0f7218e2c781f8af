"""Token-rate measurement of a runner: time to first token, prefill and decode tokens/s, peak RSS.

Each measurement is repeated after a warm-up; the medians are reported, with the samples, in records
shaped like llama-bench's (test, n_tokens, avg_ts, stddev_ts, samples_ts)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

from mobilize.runtime_harness.runner import Runner


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
    records = [_record(f"pp{prompt_len}", prompt_len, prefill_s), _record(f"tg{gen_len}", gen_len, decode_s)]
    return {
        "time_to_first_token_s": statistics.median(prefill_s),
        "prefill_tokens_per_s": records[0]["avg_ts"],
        "decode_tokens_per_s": records[1]["avg_ts"],
        "peak_rss_bytes": peak_rss_bytes(),
        "records": records,
    }


def _record(test: str, n_tokens: int, seconds: list[float]) -> dict[str, Any]:
    rates = [n_tokens / s for s in seconds]
    return {
        "test": test,
        "n_tokens": n_tokens,
        "avg_ts": statistics.median(rates),
        "stddev_ts": statistics.stdev(rates) if len(rates) > 1 else 0.0,
        "samples_ts": rates,
    }
