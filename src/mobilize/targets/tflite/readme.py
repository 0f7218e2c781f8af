"""`README.md` of a LiteRT (TFLite) package, for the app developer: what is inside and how to load it."""

from __future__ import annotations

from mobilize.manifest import Manifest
from mobilize.targets.base import exported_from


def tflite_readme(manifest: Manifest, file_names: list[str]) -> str:
    """`manifest` without its file list (the README is one of the files it hashes)."""
    arch, recipe, target, kv = manifest.architecture, manifest.recipe, manifest.target, manifest.kv_cache
    files = "\n".join(f"| `{name}` |" for name in [*file_names, "README.md", "manifest.json"])
    rows = "\n".join(
        f"| `{key}` | "
        + ", ".join(f"`{v.name}` {v.dtype.lower()} {list(v.shape)}" for v in sig.inputs if "kv_cache" not in v.name)
        + " |"
        for key, sig in (manifest.io.signatures or {}).items()
    )
    longest = max(target.lowering["prefill_lens"])
    return f"""# {arch.family} for {target.preset}: LiteRT (TFLite) package

{exported_from(manifest)}
Quantization recipe `{recipe.name}`: {recipe.description}.

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
{kv.details["shape"]} (batch, KV heads, positions, head size): pass each call's returned caches to the next.
Each signature writes its tokens' keys and values at `input_pos[0]` (DYNAMIC_UPDATE_SLICE) and masks
every slot past each token's position, so a prompt may be padded at its end. `logits` is
[1, tokens, {arch.vocab_size}]. `input_pos` holds the position of each token (0 for the first).

## Load it

```python
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path="path/to/this/package/model.tflite", num_threads={target.threads or 2})  # big cores
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
