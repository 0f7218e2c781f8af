"""`README.md` of a package, for the app developer who receives it: what is inside and how to load it."""

from __future__ import annotations

from typing import Any


def package_readme(manifest: dict[str, Any], file_names: list[str]) -> str:
    """`manifest` without its file list (the README is one of the files it hashes)."""
    if manifest["format"] == "tflite":
        return _tflite_readme(manifest, file_names)
    arch, recipe, target = manifest["architecture"], manifest["recipe"], manifest["target"]
    kv = manifest["kv_cache"]
    files = "\n".join(f"| `{name}` |" for name in [*file_names, "README.md", "manifest.json"])
    io_rows = "\n".join(
        f"| {kind} | `{v['name']}` | {v['dtype']} | {v['shape']} |"
        for kind, values in (("in", manifest["io"]["inputs"]), ("out", manifest["io"]["outputs"]))
        for v in values[:4] + ([{"name": "...", "dtype": "", "shape": ""}] if len(values) > 4 else [])
    )
    if kv.get("layout") == "static":
        window = kv.get("sliding_window")
        cache = (
            f"Fixed-size KV buffers of {kv['max_seq_len']} positions, bound as both `past_key_values.*` and "
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
    if target.get("logits") == "last":
        cache += (
            " `logits` is the last input position's only ([batch, 1, vocab]), the next token's scores: a "
            "prompt costs the output head once (export with `--logits all` for every position's)."
        )
    return f"""# {arch["family"]} for {target["name"]}: ONNX package

Exported by mobilize {manifest["mobilize_version"]} from `{manifest["source"]["id"]}` ({manifest["source"]["format"]}).
Quantization recipe `{recipe["name"]}`: {recipe["description"]}.

## Inside

| file |
|---|
{files}

`manifest.json` has every file's size and sha256 (`mobilize verify` checks them), the architecture,
the pass report (fusions, per-tensor quantization error) and the model's inputs and outputs.

## Load it

ONNX Runtime GenAI reads this directory as it is (`genai_config.json`):

```python
import json
import onnxruntime_genai as og
model = og.Model("path/to/this/package")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length={kv.get("max_seq_len", arch["max_position_embeddings"])})
generator = og.Generator(model, params)
bos = json.load(open("path/to/this/package/genai_config.json"))["model"].get("bos_token_id")
# GenAI's tokenizer (0.18) does not add the BOS token the model was trained with: prepend it.
generator.append_tokens(([bos] if bos is not None else []) + list(tokenizer.encode("Hello")))
while not generator.is_done():
    generator.generate_next_token()
```

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


def _tflite_readme(manifest: dict[str, Any], file_names: list[str]) -> str:
    arch, recipe, target, kv = manifest["architecture"], manifest["recipe"], manifest["target"], manifest["kv_cache"]
    files = "\n".join(f"| `{name}` |" for name in [*file_names, "README.md", "manifest.json"])
    rows = "\n".join(
        f"| `{key}` | "
        + ", ".join(
            f"`{v['name']}` {v['dtype'].lower()} {v['shape']}" for v in sig["inputs"] if "kv_cache" not in v["name"]
        )
        + " |"
        for key, sig in manifest["io"]["signatures"].items()
    )
    longest = max(target["prefill_lens"])
    return f"""# {arch["family"]} for {target["name"]}: LiteRT (TFLite) package

Exported by mobilize {manifest["mobilize_version"]} from `{manifest["source"]["id"]}` ({manifest["source"]["format"]}).
Quantization recipe `{recipe["name"]}`: {recipe["description"]}.

## Inside

| file |
|---|
{files}

`model.tflite` is one file whatever its size: weight buffers follow the flatbuffer (the schema's
offset/size), shared by every signature. `manifest.json` has every file's size and sha256
(`mobilize verify` checks them), the architecture, the quantization report and the signatures.

## Signatures

| signature | inputs besides the cache |
|---|---|
{rows}

Every signature also takes and returns `kv_cache_k_<layer>` and `kv_cache_v_<layer>`, float32
{kv["shape"]} (batch, KV heads, positions, head size): pass each call's returned caches to the next.
Each signature writes its tokens' keys and values at `input_pos[0]` (DYNAMIC_UPDATE_SLICE) and masks
every slot past each token's position, so a prompt may be padded at its end. `logits` is
[1, tokens, {arch["vocab_size"]}]. `input_pos` holds the position of each token (0 for the first).

## Load it

```python
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path="path/to/this/package/model.tflite", num_threads=4)
prefill, decode = it.get_signature_runner("prefill_{longest}"), it.get_signature_runner("decode")
cache = {{n: np.zeros(d["shape"], np.float32)
         for n, d in decode.get_input_details().items() if n.startswith("kv_cache_")}}
ids = [2, 651, 6037, 576, 6081, 603]  # the tokenized prompt (tokenizer.json), BOS first
out = prefill(tokens=np.array([ids + [0] * ({longest} - len(ids))], np.int32),
              input_pos=np.arange({longest}, dtype=np.int32), **cache)
cache = {{n: out[n] for n in cache}}
token, pos = int(out["logits"][0, len(ids) - 1].argmax()), len(ids)
for _ in range(16):
    out = decode(tokens=np.array([[token]], np.int32), input_pos=np.array([pos], np.int32), **cache)
    cache = {{n: out[n] for n in cache}}
    token, pos = int(out["logits"][0, 0].argmax()), pos + 1
```

On Android, LiteRT (the `com.google.ai.edge.litert` AAR, XNNPACK on the CPU) runs the same
signatures; LiteRT-LM binds the `kv_cache_*` tensors by these names.

## Measure it

`mobilize bench <package>` prints time to first token, prefill and decode tokens/s and peak RSS on the
machine it runs on; `mobilize run <package> --prompt "..."` streams greedy text.
"""
