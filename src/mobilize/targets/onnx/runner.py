"""Run a mobilize decoder graph in onnxruntime, with either cache layout.

Static (fixed-length KV inputs): one buffer per cache tensor, bound through IOBinding as both the past
input and the present output, so attention writes each step's keys in place. Dynamic (Concat cache):
the presents of one step are fed back as the pasts of the next.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mobilize.errors import MobilizeError, runtime_reason


def _concrete(shape: list, package: Path) -> list:
    """A cache shape with symbolic heads/head size (other exporters leave them named) filled in from the
    package's genai_config.json; batch and length stay as they are."""
    if all(isinstance(d, int) for d in (shape[1], shape[3])):
        return shape
    config = package / "genai_config.json"
    if not config.is_file():
        raise MobilizeError(f"{package}: the KV cache shape {shape} names its sizes and there is no genai_config.json")
    decoder = json.loads(config.read_text())["model"]["decoder"]
    return [shape[0], decoder["num_key_value_heads"], shape[2], decoder["head_size"]]


def _shared_buffer_lengths(shapes: dict[str, list], package: Path, max_length: int = 4096) -> None:
    """Another exporter's package (ONNX Runtime GenAI's builder) may leave the cache length symbolic
    while its genai_config asks for shared past/present buffers: size them as GenAI does, `max_length`
    for global layers and window + slack for the sliding ones it lists."""
    config = package / "genai_config.json"
    if all(isinstance(s[2], int) for s in shapes.values()) or not config.is_file():
        return
    cfg = json.loads(config.read_text())
    if not cfg.get("search", {}).get("past_present_share_buffer"):
        return
    length = min(max_length, cfg["search"].get("max_length", max_length))
    window = cfg["model"]["decoder"].get("sliding_window") or {}
    sliding = set(window.get("layers", []))
    for name, shape in shapes.items():
        layer = int(name.split(".")[1])
        ring = window.get("window_size", 0) + (window.get("cache_slack") or 16)
        shape[2] = min(length, ring) if layer in sliding else length


class OrtRunner:
    """Runner over `model.onnx` with inputs input_ids / attention_mask / [position_ids] / past_key_values.*"""

    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: LoRA slots' empty defaults warn once per input otherwise
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's own exception types: a model it refuses is one line
            raise MobilizeError(f"ONNX Runtime cannot load {model_path}: {runtime_reason(e)}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.past_shapes = {n: _concrete(inputs[n].shape, Path(model_path).parent) for n in self.past_names}
        half = any(inputs[n].type == "tensor(float16)" for n in self.past_names)
        self.past_dtype = np.float16 if half else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        # A package exported with --logits last ([batch, 1, vocab]): prefill gives the last position's row
        logits = next((o.shape for o in self.session.get_outputs() if o.name == "logits"), [])
        self.last_logits_only = len(logits) == 3 and logits[1] == 1
        # Static: every cache length fixed (sliding-window layers may hold fewer positions, as a ring).
        _shared_buffer_lengths(self.past_shapes, Path(model_path).parent)
        lengths = [shape[2] for shape in self.past_shapes.values()]
        static = bool(lengths) and all(isinstance(n, int) for n in lengths)
        self.max_seq_len = max(lengths) if static else None
        self.buffers: dict[str, ort.OrtValue] = {}
        self.adapters: dict[str, dict[str, ort.OrtValue]] = {}
        self.active: dict[str, ort.OrtValue] = {}  # the active adapter's tensors, bound as inputs
        self._arrays: list[dict[str, np.ndarray]] = []
        if static:
            for name in self.past_names:
                _, kv_heads, length, head_dim = self.past_shapes[name]
                zeros = np.zeros((1, kv_heads, length, head_dim), dtype=self.past_dtype)
                self.buffers[name] = ort.OrtValue.ortvalue_from_numpy(zeros)
        self.reset()

    def load_adapter(self, name: str, params: dict[str, np.ndarray]) -> None:
        """Keep a LoRA adapter's tensors (read and checked by the caller: harness/package.py) beside the others.
        They are bound as the slots' inputs: ONNX Runtime's RunOptions.add_active_adapter is ignored by
        run_with_iobinding (measured: 1.32 gives the base model's logits), which the in-place cache needs."""
        self.adapters[name] = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()}
        self._arrays.append(params)  # (an OrtValue made from numpy borrows the array)

    def activate(self, name: str | None) -> None:
        """Run the next steps with this loaded adapter (None: the base model); the base stays loaded."""
        self.active = {} if name is None else self.adapters[name]

    @property
    def static(self) -> bool:
        return self.max_seq_len is not None

    def reset(self) -> None:
        self.cache = {}
        if not self.static:
            for name in self.past_names:
                _, kv_heads, _, head_dim = self.past_shapes[name]
                self.cache[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=self.past_dtype)
        self.length = 0

    def _feeds(self, tokens: list[int]) -> dict[str, np.ndarray]:
        n = len(tokens)
        feeds = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
            "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None, :],
        }
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def _step(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if self.static:
            if self.length + n > self.max_seq_len:
                raise MobilizeError(
                    f"{self.length + n} tokens do not fit the package's KV cache of {self.max_seq_len} "
                    "(export with a larger --max-seq-len)"
                )
            logits = self._step_in_place(tokens)
        else:
            feeds = {**self._feeds(tokens), **self.cache}
            try:
                outputs = dict(zip(self.output_names, self.session.run(None, feeds | self.active), strict=True))
            except Exception as e:  # ORT's own types: a package it cannot run is one line
                raise MobilizeError(f"ONNX Runtime failed running the package: {runtime_reason(e)}") from None
            for name in self.past_names:
                self.cache[name] = outputs[name.replace("past_key_values.", "present.")]
            logits = outputs["logits"]
        self.length += n
        return logits[0]

    def _step_in_place(self, tokens: list[int]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in self._feeds(tokens).items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits")
        for name, value in self.active.items():
            binding.bind_ortvalue_input(name, value)
        for name, buffer in self.buffers.items():
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), buffer)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise MobilizeError(f"ONNX Runtime failed running the package: {runtime_reason(e)}") from None
        return binding.get_outputs()[0].numpy()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.reset()
        return self._step(list(tokens))

    def decode(self, token: int) -> np.ndarray:
        return self._step([int(token)])[-1]

    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of every position from an empty cache: one prefill, or, where the
        package gives the last position's only, each token run in turn."""
        if not self.last_logits_only:
            return self.prefill(tokens)
        self.reset()
        return np.concatenate([self._step([int(t)]) for t in tokens])
