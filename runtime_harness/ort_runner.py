"""Run a mobilize decoder graph (dynamic KV cache form) in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OrtRunner:
    """Runner over `model.onnx` with inputs input_ids / attention_mask / position_ids / past_key_values.*"""

    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_shapes = {i.name: i.shape for i in self.session.get_inputs() if i.name in self.past_names}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.cache = {}
        for name in self.past_names:
            _, kv_heads, _, head_dim = self.past_shapes[name]
            self.cache[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        self.length = 0

    def _step(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        feeds = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
            "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None, :],
            **self.cache,
        }
        outputs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        for name in self.past_names:
            self.cache[name] = outputs[name.replace("past_key_values.", "present.")]
        self.length += n
        return outputs["logits"][0]

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.reset()
        return self._step(list(tokens))

    def decode(self, token: int) -> np.ndarray:
        return self._step([int(token)])[-1]
