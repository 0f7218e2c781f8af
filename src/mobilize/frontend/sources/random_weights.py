"""A deterministic synthetic checkpoint of a family's real shapes: export and perf work without weights."""

from __future__ import annotations

import math
import zlib

import numpy as np

from mobilize.frontend.config import DecoderConfig, expected_shapes, is_norm
from mobilize.frontend.sources.base import TensorRef


def random_tensors(cfg: DecoderConfig, std: float = 0.02) -> dict[str, TensorRef]:
    """Every tensor of `cfg`, generated on load from a seed derived from its name (same bytes every run)."""
    refs = {}
    for name, shape in expected_shapes(cfg).items():
        refs[name] = TensorRef(name, shape, "F32", 4 * math.prod(shape), _generator(name, shape, cfg, std))
    return refs


def _generator(name: str, shape: tuple[int, ...], cfg: DecoderConfig, std: float):
    def load() -> np.ndarray:
        if is_norm(name):  # a norm of scale one: zero in Gemma's (1 + w) convention
            return np.full(shape, 0.0 if cfg.norm_plus_one else 1.0, dtype=np.float32)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(std)
        return out

    return load
