"""The peer: llama.cpp (through llama-cpp-python) on the same GGUF, behind the Runner protocol, so the
harness's own measurement (perf.measure: warm-up, repeats, medians) times it exactly as it times ours.

llama-cpp-python compiles llama.cpp when installed (`pip install llama-cpp-python`, a few minutes);
it is a bench-only dependency, not one of mobilize's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class LlamaCppRunner:
    """prefill/decode/reset over llama.cpp's context: `eval` of the prompt, then one token at a time."""

    def __init__(self, gguf: str | Path, threads: int = 2, n_ctx: int = 2048, logits_all: bool = False) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
            logits_all=logits_all, verbose=False,
        )  # fmt: skip
        self.logits_all = logits_all

    def reset(self) -> None:
        self.llm.reset()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        if self.logits_all:
            return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)
        return np.array(self.llm.scores[len(tokens) - 1 : len(tokens)], dtype=np.float32)

    def decode(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
