"""The reference without torch: the one decoder (model/decoder.py) in float32 numpy on the source checkpoint,
read by mobilize's own loader. It computes what the package's graph computes before any pass or
quantization, so it is the reference `mobilize eval` compares a package with unless asked for transformers."""

from __future__ import annotations

import numpy as np

from mobilize.frontend.loader import LoadedModel
from mobilize.model.decoder import decode
from mobilize.model.numpy_emitter import NumpyEmitter


class NumpyRunner:
    """The Runner protocol (prefill, decode, reset) with the keys and values of every layer kept between steps."""

    def __init__(self, model: LoadedModel) -> None:
        self.cfg, self.weights = model.config, model.weights
        self.loaded: dict[str, np.ndarray] = {}  # every weight read once, kept for the next steps
        self.reset()

    @classmethod
    def for_source(cls, source: str, adapters: list[dict] | None = None) -> NumpyRunner:
        """The source's model, with LoRA adapters merged (manifest records: each file checked by its digest)."""
        from mobilize.frontend.loader import load_model, open_checkpoint

        model = load_model(open_checkpoint(source))
        if adapters:
            from mobilize.frontend.lora import apply_adapters

            model = apply_adapters(model, [a["path"] for a in adapters], adapters)[0]
        return cls(model)

    def reset(self) -> None:
        self.cache: list[tuple[np.ndarray, np.ndarray]] = []

    def _step(self, tokens: list[int]) -> np.ndarray:
        emitter = NumpyEmitter(self.cfg, self.weights, [list(tokens)], keep_weights=True, loaded=self.loaded,
                               cache=self.cache)  # fmt: skip
        return decode(self.cfg, emitter)[0]

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.reset()
        return self._step(list(tokens))

    def decode(self, token: int) -> np.ndarray:
        return self._step([int(token)])[-1]
