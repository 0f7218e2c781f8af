"""`mobilize inspect`: what a checkpoint is, without reading its weights."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from mobilize.frontend.config import SLIDING
from mobilize.frontend.loader import load_model, open_checkpoint


def inspect_source(spec: str, random_weights: bool = False) -> dict[str, Any]:
    model = load_model(open_checkpoint(spec, random_weights))
    ckpt, cfg = model.ckpt, model.config
    dtypes = Counter(ref.dtype for ref in ckpt.tensors.values())
    param_bytes = Counter()
    for ref in ckpt.tensors.values():
        param_bytes[ref.dtype] += ref.nbytes
    n_sliding = sum(t == SLIDING for t in cfg.layer_types)
    return {
        "source": ckpt.source,
        "format": ckpt.format,
        "family": cfg.family,
        "layers": cfg.num_layers,
        "sliding_window_layers": n_sliding,
        "sliding_window": cfg.sliding_window,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "parameters": cfg.num_params,
        "tensors": len(ckpt.tensors),
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "tensor_bytes_by_dtype": dict(sorted(param_bytes.items())),
        "bytes_on_disk": ckpt.bytes_on_disk,
        "files": [f for f in ckpt.files],
        "config": dataclasses.asdict(cfg),
    }
