"""The reference runner: transformers (PyTorch, fp32, eager attention) on the source checkpoint."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np


class ReferenceRunner:
    """Runs the original model through transformers' own loader: a HF directory or a GGUF file."""

    def __init__(self, source: str | Path, gguf_file: str | None = None, adapters: list[str] = ()) -> None:
        import torch  # (an ImportError is the caller's one line: harness/evaluate.py)
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a failing command's stderr stays its one error line

        self.torch = torch
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=torch.float32, attn_implementation="eager", **kwargs
        ).eval()
        for adapter in adapters:  # PEFT's own LoRA layers, merged in turn (an independent implementation of ours)
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(adapter)).merge_and_unload().eval()
        # transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name warns on every call and
        # goes in 5.40); the cache object is updated in place either way.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.reset()

    @classmethod
    def for_path(cls, path: str | Path, adapters: list[str] = ()) -> ReferenceRunner:
        path = Path(path)
        if path.is_file():
            return cls(path.parent, gguf_file=path.name, adapters=adapters)
        return cls(path, adapters=adapters)

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.length = 0

    def _step(self, tokens: list[int]) -> np.ndarray:
        torch = self.torch
        n = len(tokens)
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([tokens]),
                attention_mask=torch.ones(1, self.length + n, dtype=torch.long),
                position_ids=torch.arange(self.length, self.length + n)[None, :],
                use_cache=True,
                **{self._cache_arg: self.cache},
            )
        self.length += n
        return out.logits[0].float().numpy()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.reset()
        return self._step(list(tokens))

    def decode(self, token: int) -> np.ndarray:
        return self._step([int(token)])[-1]
