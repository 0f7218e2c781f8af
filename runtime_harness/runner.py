"""The Runner protocol every backend implements: prefill a prompt, decode one token at a time."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Run the prompt from an empty cache; return logits [len(tokens), vocab] (float32)."""

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the cache; return its logits [vocab]."""

    def reset(self) -> None:
        """Forget the cache."""


def greedy(runner: Runner, prompt: list[int], n_new: int, eos: set[int] | None = None) -> list[int]:
    """Greedy continuation of `prompt`: the `n_new` tokens after it (fewer if an eos token comes)."""
    runner.reset()
    token = int(np.argmax(runner.prefill(prompt)[-1]))
    out = [token]
    while len(out) < n_new and not (eos and token in eos):
        token = int(np.argmax(runner.decode(token)))
        out.append(token)
    return out
