"""The TFLite (LiteRT) target: the decoder lowered once per signature, `model.tflite` written with the official
schema, and optionally the `.litertlm` bundle LiteRT-LM's engine runs."""

from __future__ import annotations

from pathlib import Path

from mobilize.frontend.loader import LoadedModel
from mobilize.frontend.tokenizer import special_token_ids
from mobilize.manifest import Architecture, Io, Manifest, TargetRecord
from mobilize.quant.recipes import Recipe
from mobilize.targets.base import Lowering, Statistics, Written
from mobilize.targets.tflite.caps import TFLITE_CAPS
from mobilize.targets.tflite.emitter import build_tflite, tflite_kv
from mobilize.targets.tflite.lora import ATTENTION, LITERT_LM_RANKS
from mobilize.targets.tflite.readme import tflite_readme
from mobilize.targets.tflite.runner import prefill_lengths
from mobilize.targets.tflite.writer import tflite_io, weight_bytes


class TfliteTarget:
    name = "tflite"
    caps = TFLITE_CAPS
    kv_dtypes = ("float32",)  # float16 costs a float32 copy per read (see kv_read_bytes): only when asked
    lazy_statistics = False  # the flatbuffer's scales are laid out before any buffer: calibration comes first

    def check(self, how: Lowering) -> None:
        from mobilize.errors import MobilizeError

        if how.logits != "last":
            raise MobilizeError("--logits all is for ONNX packages (TFLite's signatures give the last position's)")
        if how.lora_slots is not None:
            others = [t for t in how.lora_slots.targets if t not in ATTENTION]
            if others:
                raise MobilizeError(f"--lora-targets {','.join(others)}: TFLite's LoRA slots are on attention "
                                    "projections only (q,k,v,o: the inputs LiteRT-LM binds); use --format onnx, or "
                                    "merge the adapter with --lora")  # fmt: skip
            if how.bundle == "litertlm" and how.lora_slots.rank not in LITERT_LM_RANKS:
                raise MobilizeError(f"--lora-slots {how.lora_slots.rank} with --bundle litertlm: LiteRT-LM runs LoRA "
                                    "of rank 16 or 32 only (a smaller adapter is padded to the slots' rank)")

    def lower(self, model: LoadedModel, recipe: Recipe, how: Lowering, statistics: Statistics, phase):
        phase("lowering to TFLite")
        return build_tflite(
            model, recipe, how.max_seq_len, list(how.prefill_lens), statistics and statistics(), how.kv_dtype,
            how.lora_slots,
        )

    def write(self, lowered, model: LoadedModel, how: Lowering, out: Path, phase) -> Written:
        tfl, quant_report = lowered
        phase("writing model.tflite (weights streamed)")
        tfl.write(out / "model.tflite")
        io = Io.parse(tflite_io(out / "model.tflite"), "the written model.tflite")
        reports = [{"pass": "tflite_lowering", "signatures": sorted(io.signatures), **quant_report}]
        prefill = prefill_lengths(io.signatures)
        return Written(io, tflite_kv(model.config, how.max_seq_len, how.kv_dtype), reports, {"prefill_lens": prefill})

    def weight_bytes(self, package_dir: Path) -> tuple[int, int]:
        return weight_bytes(package_dir / "model.tflite")

    activations_are = "one token's logits and the longest prefill's attention scores"

    def activation_bytes(self, arch: Architecture, target: TargetRecord, kv_dtype: str, prompt_len: int) -> int:
        """Prefill computes no logits: one token's, and the longest prefill's attention scores."""
        longest = max(target.lowering.get("prefill_lens", [prompt_len]))
        out = arch.vocab_size * 4 + longest * arch.num_heads * target.max_seq_len * 4
        if kv_dtype == "float16":  # one layer's keys and values cast up
            out += 2 * arch.num_kv_heads * target.max_seq_len * arch.head_dim * 4
        return out

    def kv_cache_bytes(self, config, max_seq_len: int, kv_dtype: str) -> int:
        """Every layer's buffer is max_seq_len long (a sliding layer gathers its window from it)."""
        per = 2 * config.num_kv_heads * min(max_seq_len, config.max_position_embeddings) * config.head_dim
        return config.num_layers * per * (2 if kv_dtype == "float16" else 4)

    def kv_read_bytes(self, kv_bytes: int, kv_dtype: str) -> int:
        # a float16 cache is read, cast up into float32 and that copy read by the attention (no float16 BATCH_MATMUL)
        return kv_bytes * 5 if kv_dtype == "float16" else kv_bytes

    def readme(self, manifest: Manifest, file_names: list[str]) -> str:
        return tflite_readme(manifest, file_names)

    def check_tokenizer(self, package: Path) -> dict:
        from mobilize.targets.tflite.tokenizer_parity import check_with_litert_lm

        return check_with_litert_lm(package)

    def finish(self, model: LoadedModel, manifest: Manifest, how: Lowering, out: Path, phase) -> None:
        if how.bundle != "litertlm":
            return
        from mobilize.targets.tflite.litertlm import write_litertlm

        phase("writing model.litertlm")
        ids = special_token_ids(model.ckpt)
        eos = ids["eos_token_id"]
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        write_litertlm(out, manifest, _bos_added(out, ids["bos_token_id"]), eos, out / "model.litertlm")


def _bos_added(package: Path, bos: int | None) -> int | None:
    """The BOS id if the model's tokenizer puts one before a text (Gemma, Llama), else None: LiteRT-LM puts the
    bundle's start token before every session's first prompt, and Qwen's files name `<|endoftext|>` as BOS without
    ever adding it."""
    if bos is None or not (package / "tokenizer.json").is_file():
        return bos
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(package / "tokenizer.json")).encode("a").ids
    return bos if ids[:1] == [bos] else None


TARGET = TfliteTarget()
