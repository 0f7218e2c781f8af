"""Weight conventions every emitter applies the same way."""

from __future__ import annotations

import numpy as np

from mobilize.frontend.config import DecoderConfig, is_norm


def norm_weight(cfg: DecoderConfig, name: str, w: np.ndarray) -> np.ndarray:
    """A norm's effective scale: Gemma stores w and scales by (1 + w); other families store the scale."""
    return w + np.float32(1.0) if cfg.norm_plus_one and is_norm(name) else w


def stored_norm_weight(cfg: DecoderConfig, name: str, effective: np.ndarray) -> np.ndarray:
    """The stored form of a norm's effective scale (`norm_weight`'s inverse)."""
    return effective - np.float32(1.0) if cfg.norm_plus_one and is_norm(name) else effective
