"""A Runner over ONNX Runtime GenAI (`onnxruntime_genai`): the runtime an app embeds, running a package
directory as it is (its own KV cache management, in-place where the package allows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError, runtime_reason


class GenAIRunner:
    def __init__(self, package: str | Path, threads: int = 0, max_length: int | None = None) -> None:
        from mobilize.optional import require

        og = require("onnxruntime_genai")

        self.og = og
        config = og.Config(str(package))
        if threads:
            options = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
            config.overlay(json.dumps(options))
        try:
            self.model = og.Model(config)
        except Exception as e:
            raise MobilizeError(f"ONNX Runtime GenAI cannot load {package}: {runtime_reason(e)}") from None
        genai = json.loads((Path(package) / "genai_config.json").read_text())
        self.max_length = max_length or genai["search"]["max_length"]
        self.generator = None

    def reset(self) -> None:
        self.generator = None

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Logits of the last prompt token only ([1, vocab]): GenAI keeps just those."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(list(tokens))
        return np.asarray(self.generator.get_logits()).reshape(1, -1)

    def decode(self, token: int) -> np.ndarray:
        self.generator.append_tokens([int(token)])
        return np.asarray(self.generator.get_logits()).reshape(-1)
