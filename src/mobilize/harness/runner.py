"""The Runner protocol every backend implements: prefill a prompt, decode one token at a time."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Run the prompt from an empty cache; return logits [n, vocab] (float32): n = len(tokens), or 1
        (the last token's only) for runners whose prompt pass computes no per-position logits."""

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the cache; return its logits [vocab]."""

    def reset(self) -> None:
        """Forget the cache."""


def score(runner: Runner, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), vocab] of every position from an empty cache (a runner's `score` if it has
    one, for runners whose `prefill` returns the last row only)."""
    scorer = getattr(runner, "score", None)
    return scorer(tokens) if scorer is not None else runner.prefill(tokens)


def greedy(runner: Runner, prompt: list[int], n_new: int, eos: set[int] | None = None) -> list[int]:
    """Greedy continuation of `prompt`: the `n_new` tokens after it (fewer if an eos token comes)."""
    runner.reset()
    token = int(np.argmax(runner.prefill(prompt)[-1]))
    out = [token]
    while len(out) < n_new and not (eos and token in eos):
        token = int(np.argmax(runner.decode(token)))
        out.append(token)
    return out
