"""Token rate of a `.litertlm` bundle in LiteRT-LM's own engine (`litert-lm-api`): the C++ runtime an app
embeds, which binds each KV cache tensor as both input and output (updated in place) and runs the
prompt through the prefill signatures. One run gives the timings `harness/perf.py` summarizes."""

from __future__ import annotations

from pathlib import Path

from mobilize import cache_root
from mobilize.errors import MobilizeError


def _engine_cache() -> Path:
    """Where the engine keeps its packed weights (by default beside the bundle: inside the package)."""
    path = cache_root() / "litert-lm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_litertlm(bundle: Path, threads: int, prompt_len: int, gen_len: int) -> tuple[float, float, float]:
    """One run of the engine's benchmark (it loads the bundle, prefills `prompt_len` tokens and decodes
    `gen_len`): (time to first token, prefill, decode) in seconds."""
    try:
        import litert_lm
    except ImportError as e:  # the wheel exists for Linux x86-64/arm64 and macOS arm64 only
        raise MobilizeError(f"LiteRT-LM's engine is not available here ({e}); pip install litert-lm-api") from None
    if not bundle.is_file():
        raise MobilizeError(f"{bundle.parent} has no {bundle.name}: export it with --bundle litertlm")
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    info = litert_lm.Benchmark(
        model_path=str(bundle), backend=litert_lm.Backend.CPU(thread_count=threads or None),
        prefill_tokens=prompt_len, decode_tokens=gen_len, cache_dir=str(_engine_cache()),
        activation_data_type=litert_lm.ActivationDataType.FLOAT32,
    ).run()  # fmt: skip
    if info.last_prefill_token_count != prompt_len or info.last_decode_token_count != gen_len:
        raise MobilizeError(
            f"LiteRT-LM ran {info.last_prefill_token_count} prompt and {info.last_decode_token_count} new tokens "
            f"where {prompt_len} and {gen_len} were asked (the bundle's cache is too short?)"
        )
    return (info.time_to_first_token_in_second, prompt_len / info.last_prefill_tokens_per_second,
            gen_len / info.last_decode_tokens_per_second)  # fmt: skip
