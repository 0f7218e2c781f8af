"""`--bundle litertlm`: the package's model.tflite, its tokenizer and LLM metadata in one `.litertlm` file,
the form LiteRT-LM's engine (`litert-lm-api`, and its Android/iOS libraries) opens, through the official
`litert-lm-builder`.

The model already follows the engine's conventions: a `decode` signature and `prefill_<L>` ones, inputs
`tokens` and `input_pos`, `kv_cache_k_<i>` / `kv_cache_v_<i>` passed in and out under the same names
(the engine binds both to one buffer on CPU, so the cache is updated in place), logits
(batch, seq, vocab) from decode. The cache length comes from the KV tensors' shape.

The builder stamps each bundle with a random uuid and the current time; mobilize gives both from the
bundled bytes instead (uuid5 of their sha256, the time from SOURCE_DATE_EPOCH, 0 by default) so a bundle
rebuilds byte for byte like the rest of the package.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import tempfile
import uuid
from pathlib import Path

from mobilize.errors import MobilizeError
from mobilize.frontend.families.registry import FAMILIES
from mobilize.manifest import Manifest


def llm_metadata(family: str, bos: int | None, eos: list[int], max_tokens: int):
    from litert_lm_builder import litertlm_builder as lb

    m = lb.llm_metadata_pb2.LlmMetadata()
    if bos is not None:
        m.start_token.token_ids.ids.append(bos)
    for token in eos:
        m.stop_tokens.add().token_ids.ids.append(token)
    m.max_num_tokens = max_tokens
    chat = FAMILIES[family].chat  # turn markers, for the engine's conversation API
    if chat is not None:
        m.prompt_templates.user.prefix, m.prompt_templates.user.suffix = chat.user
        m.prompt_templates.model.prefix, m.prompt_templates.model.suffix = chat.model
        m.stop_tokens.add().token_str = chat.end_of_turn
    m.llm_model_type.generic_model.SetInParent()
    m.supports_thinking = False
    m.supports_function_calling = False
    return m


@contextlib.contextmanager
def _reproducible_stamp(content_hash: str):
    from litert_lm_builder import litertlm_builder as lb

    original = lb.populate_system_metadata
    when = datetime.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), datetime.timezone.utc)

    def populate(system_metadata):
        kept = [m for m in system_metadata if m.key not in ("uuid", "creation_timestamp")]
        return [
            *kept,
            lb.Metadata(key="uuid", value=str(uuid.uuid5(uuid.NAMESPACE_URL, content_hash)), dtype=lb.DType.STRING),
            lb.Metadata(key="creation_timestamp", value=when.isoformat(), dtype=lb.DType.STRING),
        ]

    lb.populate_system_metadata = populate
    try:
        yield
    finally:
        lb.populate_system_metadata = original


def write_litertlm(package: Path, manifest: Manifest, bos: int | None, eos: list[int], out: Path) -> None:
    """`out` (.litertlm) from the package directory's model.tflite and tokenizer.json."""
    from google.protobuf import text_format
    from litert_lm_builder import litertlm_builder as lb

    tokenizer = package / "tokenizer.json"
    if not tokenizer.is_file():
        raise MobilizeError("--bundle litertlm needs the model's tokenizer (tokenizer.json); this source has none")
    meta = llm_metadata(manifest.architecture.family, bos, eos, manifest.target.max_seq_len)
    digest = hashlib.sha256()
    for f in (package / "model.tflite", tokenizer):
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    with tempfile.TemporaryDirectory() as tmp:
        meta_file = Path(tmp) / "llm_metadata.pbtext"
        meta_file.write_text(text_format.MessageToString(meta))
        builder = lb.LitertLmFileBuilder()
        builder.add_system_metadata(lb.Metadata(key="Authors", value="mobilize", dtype=lb.DType.STRING))
        builder.add_llm_metadata(str(meta_file))
        builder.add_tflite_model(str(package / "model.tflite"), lb.TfLiteModelType.PREFILL_DECODE)
        builder.add_hf_tokenizer(str(tokenizer))
        with _reproducible_stamp(digest.hexdigest()), open(out, "wb") as f:
            builder.build(f, validate_metadata=True)
