"""Run a mobilize LiteRT model (`model.tflite`) with ai_edge_litert's interpreter (XNNPACK on CPU).

The model's signatures: `prefill_<L>` for one or more lengths and `decode`, all with tokens, input_pos
and the KV cache tensors in and out. A prompt is cut into chunks of the longest prefill length (the
last chunk padded at the end, or run token by token where padding would pass the cache's end); then
one `decode` call per token. The cache arrays go in and come back each call: the Python interpreter
API has no way to bind one buffer as both a signature's input and its output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mobilize.compiler.errors import MobilizeError


class LiteRtRunner:
    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads or None)
        signatures = self.interpreter.get_signature_list()
        if "decode" not in signatures:
            raise MobilizeError(f"{model_path}: no 'decode' signature (found {sorted(signatures)})")
        self.prefill_lens = sorted(int(k.split("_")[1]) for k in signatures if k.startswith("prefill_"))
        self.runners = {k: self.interpreter.get_signature_runner(k) for k in signatures}
        details = self.runners["decode"].get_input_details()
        self.kv_names = [n for n in signatures["decode"]["inputs"] if n.startswith("kv_cache_")]
        self.kv_shapes = {n: tuple(details[n]["shape"]) for n in self.kv_names}
        self.max_len = self.kv_shapes[self.kv_names[0]][2]
        self.reset()

    def reset(self) -> None:
        self.cache = {n: np.zeros(s, np.float32) for n, s in self.kv_shapes.items()}
        self.length = 0

    def _call(self, signature: str, tokens: list[int], start: int) -> np.ndarray:
        n = len(tokens)
        out = self.runners[signature](
            tokens=np.asarray([tokens], np.int32), input_pos=np.arange(start, start + n, dtype=np.int32), **self.cache
        )
        self.cache = {name: out[name] for name in self.kv_names}
        return out["logits"][0]

    def _room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise MobilizeError(
                f"{self.length + n} tokens do not fit the model's KV cache of {self.max_len}; "
                "export with a larger --max-seq-len"
            )

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.reset()
        self._room(len(tokens))
        logits = []
        pos = 0
        while pos < len(tokens):
            rest = tokens[pos:]
            fits = [n for n in self.prefill_lens if n >= len(rest) and pos + n <= self.max_len]
            if len(rest) >= (self.prefill_lens[-1] if self.prefill_lens else 1 << 62):
                n = self.prefill_lens[-1]
                logits.append(self._call(f"prefill_{n}", rest[:n], pos))
            elif fits:  # the shortest signature that holds the rest, padded at the end
                n = fits[0]
                pad = rest + [0] * (n - len(rest))
                logits.append(self._call(f"prefill_{n}", pad, pos)[: len(rest)])
                n = len(rest)
            else:  # no signature fits before the cache's end: one token at a time
                n = 1
                logits.append(self._call("decode", rest[:1], pos))
            pos += n
        self.length = len(tokens)
        return np.concatenate(logits, axis=0)

    def decode(self, token: int) -> np.ndarray:
        self._room(1)
        logits = self._call("decode", [token], self.length)
        self.length += 1
        return logits[0]
