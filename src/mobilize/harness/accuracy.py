"""Accuracy measures over a runner: perplexity on token ids, top-1 agreement with a reference."""

from __future__ import annotations

import numpy as np

from mobilize.harness.runner import Runner, score


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(runner: Runner, ids: list[int], chunk: int = 256) -> float:
    """exp(mean negative log-likelihood) of each token given those before it in its chunk."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk + 1]
        if len(piece) < 2:
            break
        logp = log_softmax(score(runner, piece[:-1]))
        nll -= float(logp[np.arange(len(piece) - 1), piece[1:]].sum())
        count += len(piece) - 1
    return float(np.exp(nll / count))
