"""`README.md` of an ONNX package, for the app developer who receives it: what is inside and how to load it."""

from __future__ import annotations

from mobilize.manifest import Manifest
from mobilize.targets.base import exported_from


def onnx_readme(manifest: Manifest, file_names: list[str]) -> str:
    """`manifest` without its file list (the README is one of the files it hashes)."""
    arch, recipe, target, kv = manifest.architecture, manifest.recipe, manifest.target, manifest.kv_cache
    threads = target.threads or "the runtime's default"
    length = kv.max_seq_len or arch.record["max_position_embeddings"]
    files = "\n".join(f"| `{name}` |" for name in [*file_names, "README.md", "manifest.json"])
    rows = []
    for kind, values in (("in", manifest.io.inputs), ("out", manifest.io.outputs)):
        rows += [f"| {kind} | `{v.name}` | {v.dtype} | {list(v.shape)} |" for v in values[:4]]
        rows += [f"| {kind} | `...` |  |  |"] if len(values) > 4 else []
    io_rows = "\n".join(rows)
    if kv.layout == "static":
        window = kv.details.get("sliding_window")
        cache = (
            f"Fixed-size KV buffers of {kv.max_seq_len} positions, bound as both `past_key_values.*` and "
            "`present.*` (ONNX Runtime GenAI does this itself: `past_present_share_buffer`); attention writes "
            "each step in place."
        )
        if window:
            cache += (
                f" Sliding-window layers {window['layers']} keep ring buffers of {window['window']} + "
                f"{window['slack']} positions (GenAI needs `max_length` >= {window['window'] + window['slack']})."
            )
    else:
        cache = "A KV cache that grows: feed each step's `present.*` back as the next `past_key_values.*`."
    if target.lowering.get("logits") == "last":
        cache += (
            " `logits` is the last input position's only ([batch, 1, vocab]), the next token's scores: a "
            "prompt costs the output head once (export with `--logits all` for every position's)."
        )
    return f"""# {arch.family} for {target.preset}: ONNX package

{exported_from(manifest)}
Quantization recipe `{recipe.name}`: {recipe.description}.{_slots(manifest)}

## Inside

| file |
|---|
{files}

`manifest.json` has every file's size and sha256 (`mobilize verify` checks them), the architecture,
the pass report (fusions, per-tensor quantization error) and the model's inputs and outputs.

## Load it

ONNX Runtime GenAI reads this directory as it is (`genai_config.json`; it asks for {threads} intra-op
threads, the target device's big cores: no overlay is needed):

```python
import onnxruntime_genai as og
model = og.Model("path/to/this/package")
tokenizer = og.Tokenizer(model)
# GenAI's tokenizer leaves special tokens out unless asked; asked, it adds what this package's
# tokenizer_config.json says the model was trained with (the BOS token, for most models).
tokenizer.update_options(add_special_tokens="true")
params = og.GeneratorParams(model)
params.set_search_options(max_length={length})
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("Hello"))
while not generator.is_done():
    generator.generate_next_token()
```

A chat turn rendered with `tokenizer.apply_chat_template(...)` already holds the template's BOS text: encode
it with special tokens left out (`update_options(add_special_tokens="false")`, GenAI's default), or the model
sees two.

`max_length` must be the cache's length, {length}: GenAI binds one buffer of that many positions as both
past and present (`past_present_share_buffer`), and any other value fails with
"Got invalid dimensions for input: past_key_values.0.key". To generate fewer tokens, stop the loop early (count
the tokens) rather than lowering `max_length`.

On Android, the `onnxruntime-genai` AAR exposes the same `Model`, `Tokenizer`, `Generator` classes
(Java/Kotlin); copy the package directory to app storage and pass its path. The graph needs ONNX
Runtime's contrib ops (`com.microsoft` GroupQueryAttention, MatMulNBits, ...), present in every ORT
build for mobile. Plain onnxruntime works too: see the inputs below.

## Inputs and outputs

| | name | dtype | shape |
|---|---|---|---|
{io_rows}

{cache}

## Measure it

`mobilize bench <package>` prints time to first token, prefill and decode tokens/s and peak RSS on the
machine it runs on; `mobilize run <package> --prompt "..."` streams greedy text.
"""


def _slots(manifest: Manifest) -> str:
    slots = manifest.lora_slots
    if slots is None:
        return ""
    where = f"{', '.join(slots.targets)} ({slots.modules} projections)"
    return (
        f"\n\nLoRA slots of rank {slots.rank} on {where}: inputs `<module>.lora_A` [in, r] and `<module>.lora_B` "
        "[r, out], empty by default (without an adapter this is the base model). `mobilize adapter PEFT_DIR "
        "--package THIS_DIR` writes an `.onnx_adapter` for this package; load it with ONNX Runtime GenAI "
        "(`og.Adapters(model).load(file, name)`, then `generator.set_active_adapter`), or feed its tensors as "
        "inputs with onnxruntime."
    )
