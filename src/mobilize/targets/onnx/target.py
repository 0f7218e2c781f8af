"""The ONNX target: the plain graph from the emitter, the pass pipeline, `model.onnx` + external data, and
`genai_config.json` for ONNX Runtime GenAI."""

from __future__ import annotations

import json
from pathlib import Path

from mobilize.frontend.config import SLIDING
from mobilize.frontend.loader import LoadedModel
from mobilize.frontend.tokenizer import special_token_ids
from mobilize.manifest import Architecture, Io, KvCache, Manifest, TargetRecord
from mobilize.quant.recipes import Recipe
from mobilize.targets.base import Lowering, Statistics, Written
from mobilize.targets.onnx.caps import ONNX_CAPS
from mobilize.targets.onnx.emitter import build_decoder, empty_lora_defaults
from mobilize.targets.onnx.genai_config import genai_config, graph_io
from mobilize.targets.onnx.passes.kv_cache import WINDOW_SLACK, static_kv
from mobilize.targets.onnx.pipeline import onnx_passes, run_passes, summarize
from mobilize.targets.onnx.readme import onnx_readme
from mobilize.targets.onnx.tokenizer_parity import check_with_genai
from mobilize.targets.onnx.writer import save_onnx, weight_bytes


class OnnxTarget:
    name = "onnx"
    caps = ONNX_CAPS
    kv_dtypes = ("float32", "float16")  # a preset's plan tries these in turn
    lazy_statistics = True  # MatMulNBits tensors are lazy: those that use calibration are written last

    def check(self, how: Lowering) -> None:
        from mobilize.errors import MobilizeError

        if how.bundle:
            raise MobilizeError("--bundle litertlm packs a TFLite model: use it with --format tflite")

    def lower(self, model: LoadedModel, recipe: Recipe, how: Lowering, statistics: Statistics, phase):
        if how.opset == "ort" and model.config.head_dim % 8:  # checked here, so that what exports also runs
            from mobilize.errors import MobilizeError

            raise MobilizeError(
                f"ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 8; this model's is "
                f"{model.config.head_dim}: export with --opset std (standard attention ops)"
            )
        pairs = model.config.rotary_dims // 2
        if how.opset == "ort" and pairs % 8:
            from mobilize.errors import MobilizeError

            raise MobilizeError(
                f"ONNX Runtime's GroupQueryAttention rotates a multiple of 8 pairs; this model rotates {pairs} "
                "(partial rotary): export with --opset std (standard attention ops)"
            )
        passes = onnx_passes(recipe, how.max_seq_len, how.opset, statistics, how.kv_dtype)
        phase("building graph")
        graph = build_decoder(model, last_logits=how.logits == "last", slots=how.lora_slots)
        phase(f"passes ({recipe.name})")
        reports = run_passes(graph, passes)
        empty_lora_defaults(graph)
        return graph, reports

    def write(self, lowered, model: LoadedModel, how: Lowering, out: Path, phase) -> Written:
        graph, reports = lowered
        phase("writing model.onnx (weights streamed)")
        save_onnx(graph, out)
        fields = {"opset": how.opset, "logits": how.logits}
        # (the quantization statistics came with the write)
        kv = static_kv(graph)
        if kv is None:
            cache = KvCache("dynamic")
        else:
            details = {k: v for k, v in kv.items() if k not in ("layout", "max_seq_len")}
            cache = KvCache.static(kv["max_seq_len"], how.kv_dtype, **details)
        return Written(Io.parse(graph_io(graph), "the written graph"), cache, summarize(reports), fields)

    def weight_bytes(self, package_dir: Path) -> tuple[int, int]:
        return weight_bytes(package_dir / "model.onnx")

    activations_are = "logits of a {prompt_len}-token prompt"

    def activation_bytes(self, arch: Architecture, target: TargetRecord, kv_dtype: str, prompt_len: int) -> int:
        """The prompt's logits, the largest single tensor: one row where the package gives the last only."""
        rows = 1 if target.lowering.get("logits") == "last" else prompt_len
        return rows * arch.vocab_size * 4

    def kv_cache_bytes(self, config, max_seq_len: int, kv_dtype: str) -> int:
        """Static buffers: max_seq_len positions, a sliding-window layer's window + slack (kv_cache.py)."""
        window = config.sliding_window + WINDOW_SLACK if config.sliding_window else max_seq_len
        lengths = [min(max_seq_len, window) if kind == SLIDING else max_seq_len for kind in config.layer_types]
        return sum(lengths) * 2 * config.num_kv_heads * config.head_dim * (2 if kv_dtype == "float16" else 4)

    def kv_read_bytes(self, kv_bytes: int, kv_dtype: str) -> int:
        return kv_bytes  # GroupQueryAttention reads the cache in its own dtype

    def readme(self, manifest: Manifest, file_names: list[str]) -> str:
        return onnx_readme(manifest, file_names)

    def finish(self, model: LoadedModel, manifest: Manifest, how: Lowering, out: Path, phase) -> None:
        genai = genai_config(manifest.architecture, special_token_ids(model.ckpt), manifest.io, manifest.kv_cache,
                             manifest.target.threads)  # fmt: skip
        (out / "genai_config.json").write_text(json.dumps(genai, indent=2, sort_keys=True) + "\n")

    def check_tokenizer(self, package: Path) -> dict:
        return check_with_genai(package)


TARGET = OnnxTarget()
