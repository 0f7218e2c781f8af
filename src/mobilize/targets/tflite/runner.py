"""Run a mobilize LiteRT model (`model.tflite`) with ai_edge_litert's interpreter (XNNPACK on CPU).

The model's signatures: `prefill_<L>` for one or more lengths and `decode`, all with tokens, input_pos
and the KV cache tensors in and out; only `decode` returns logits. A prompt but its last token is cut
into chunks of the longest prefill length (the last chunk padded at the end, or run token by token
where padding would pass the cache's end); its last token is decoded, which gives the logits the next
token is chosen from; then one `decode` call per token. `score` decodes every token, for the logits
of every position (perplexity).

The cache stays inside the interpreter: each signature's inputs and outputs are numpy views of its
tensors (no copy), and after a call only the slots it wrote are copied from the output cache tensors
back to the input ones. The whole cache moves only when the next call is a different signature (once
after a prompt). The Python API cannot bind one buffer as both input and output, as LiteRT-LM's C++
engine does; the model's DYNAMIC_UPDATE_SLICE still copies the cache once per call inside LiteRT.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError, runtime_reason


def prefill_lengths(keys) -> list[int]:
    """The lengths L of a model's `prefill_<L>` signatures."""
    return sorted(int(k.split("_")[1]) for k in keys if k.startswith("prefill_"))


_ZEROS = object()  # what a signature's LoRA inputs hold while no adapter is active


class _Signature:
    def __init__(self, interpreter, key: str) -> None:
        runner = interpreter.get_signature_runner(key)
        self.wrapper, self.index = interpreter._interpreter, runner._subgraph_index
        self.inputs, self.outputs = dict(runner._inputs), dict(runner._outputs)
        self.bound: object = None  # the adapter whose tensors its LoRA inputs hold (_ZEROS: none)
        try:
            with _native_stderr_quiet():  # (XNNPACK says it was created, on stderr, at the first allocation)
                self.wrapper.AllocateTensors(self.index)
        except Exception as e:
            raise MobilizeError(f"LiteRT cannot prepare the package's {key} signature: {runtime_reason(e)}") from None

    def view(self, tensor: int) -> np.ndarray:
        return self.wrapper.tensor(self.wrapper, tensor, self.index)

    def input(self, name: str) -> np.ndarray:
        return self.view(self.inputs[name])

    def output(self, name: str) -> np.ndarray:
        return self.view(self.outputs[name])


@contextlib.contextmanager
def _native_stderr_quiet():
    """File descriptor 2 to /dev/null while LiteRT's C++ logs its INFO lines (Python's sys.stderr is untouched)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LiteRtRunner:
    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            with _native_stderr_quiet():  # its delegate's INFO line would be a second line beside an error
                self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads or None)
        except Exception as e:
            raise MobilizeError(f"LiteRT cannot load {model_path}: {runtime_reason(e)}") from None
        keys = self.interpreter.get_signature_list()
        if "decode" not in keys:
            raise MobilizeError(f"{model_path}: no 'decode' signature (found {sorted(keys)})")
        if any("_lora_r" in k for k in keys):  # sessions 14's layout, which LiteRT-LM does not bind
            raise MobilizeError(f"{model_path}: its LoRA slots are separate *_lora_r<R> signatures, a layout mobilize "
                                "no longer runs (LiteRT-LM binds slots in the plain signatures); export it again")
        self.prefill_lens = prefill_lengths(keys)
        # LoRA slots: inputs of every signature (targets/tflite/lora.py), zeros while no adapter is active
        self.lora_inputs = [n for n in keys["decode"]["inputs"] if n.startswith("lora_")]
        self.adapters: dict[str, dict[str, np.ndarray]] = {}
        self.active: str | None = None
        self._signatures: dict[str, _Signature] = {}  # allocated on first use: each holds its own cache tensors
        self.kv_names = [n for n in keys["decode"]["inputs"] if n.startswith("kv_cache_")]
        self.max_len = self.signature("decode").input(self.kv_names[0]).shape[2]
        self.reset()

    def signature(self, key: str) -> _Signature:
        if key not in self._signatures:
            self._signatures[key] = _Signature(self.interpreter, key)
        return self._signatures[key]

    def load_adapter(self, name: str, params: dict[str, np.ndarray]) -> None:
        """Keep a LoRA adapter's tensors (read and checked by the caller: harness/package.py), by input name."""
        if not self.lora_inputs:
            raise MobilizeError("--adapter: this package has no LoRA slots (export it with --lora-slots RANK)")
        self.adapters[name] = params

    def activate(self, name: str | None) -> None:
        """Run the next steps with this loaded adapter in the slots' inputs (None: zeros, the base model)."""
        if name is not None and name not in self.adapters:
            raise MobilizeError(f"no adapter named {name!r} is loaded")
        self.active = name

    def reset(self) -> None:
        self.home: str | None = None  # the signature whose input tensors hold the cache
        self.length = 0

    def _call(self, key: str, tokens: list[int], start: int) -> np.ndarray | None:
        sig = self.signature(key)
        wanted = _ZEROS if self.active is None else self.active
        if self.lora_inputs and sig.bound != wanted:  # the adapter's tensors (or zeros) into its inputs, once
            values = {} if self.active is None else self.adapters[self.active]
            for name in self.lora_inputs:
                sig.input(name)[...] = values.get(name, 0)
            sig.bound = wanted
        if self.home is None:
            for name in self.kv_names:
                sig.input(name)[...] = 0
        elif self.home != key:  # move the cache once
            home = self.signature(self.home)
            for name in self.kv_names:
                sig.input(name)[...] = home.input(name)
        self.home = key
        n = len(tokens)
        sig.input("tokens")[...] = np.asarray([tokens], np.int32)
        sig.input("input_pos")[...] = np.arange(start, start + n, dtype=np.int32)
        try:
            sig.wrapper.Invoke(sig.index)
        except Exception as e:
            raise MobilizeError(f"LiteRT failed running the package: {runtime_reason(e)}") from None
        written = slice(start, min(start + n, self.max_len))
        for name in self.kv_names:  # the slots this call wrote, back into the input cache
            sig.input(name)[:, :, written] = sig.output(name)[:, :, written]
        return sig.output("logits")[0].copy() if "logits" in sig.outputs else None

    def _room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise MobilizeError(
                f"{self.length + n} tokens do not fit the model's KV cache of {self.max_len}; "
                "export with a larger --max-seq-len"
            )

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """The prompt into the cache; logits [1, vocab] of its last token."""
        self.reset()
        self._room(len(tokens))
        body, pos = tokens[:-1], 0
        while pos < len(body):
            rest = body[pos:]
            fits = [n for n in self.prefill_lens if n >= len(rest) and pos + n <= self.max_len]
            if self.prefill_lens and len(rest) >= self.prefill_lens[-1]:
                n = self.prefill_lens[-1]
                self._call(f"prefill_{n}", rest[:n], pos)
            elif fits:  # the shortest signature that holds the rest, padded at the end
                self._call(f"prefill_{fits[0]}", rest + [0] * (fits[0] - len(rest)), pos)
                n = len(rest)
            else:  # no signature fits before the cache's end: one token at a time
                n = 1
                self._call("decode", rest[:1], pos)
            pos += n
        self.length = len(body)
        return self.decode(tokens[-1])[None, :]

    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of every position: each token decoded in turn."""
        self.reset()
        self._room(len(tokens))
        return np.stack([self.decode(t) for t in tokens])

    def decode(self, token: int) -> np.ndarray:
        self._room(1)
        logits = self._call("decode", [token], self.length)
        self.length += 1
        return logits[0]
