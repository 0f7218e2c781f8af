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
        + ", ".join(f"`{v.name}` {v.dtype.lower()} {list(v.shape)}" for v in sig.inputs
                   if not v.name.startswith(("kv_cache", "lora_")))  # fmt: skip
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

Every signature also takes and returns `kv_cache_k_<layer>` and `kv_cache_v_<layer>`, {kv.dtype}
{kv.details["shape"]} (batch, KV heads, positions, head size): pass each call's returned caches to the next.
Each signature writes its tokens' keys and values at `input_pos[0]` (DYNAMIC_UPDATE_SLICE) and masks
every slot past each token's position, so a prompt may be padded at its end. Only `decode` returns
`logits`, [1, 1, {arch.vocab_size}]: prefill the prompt but its last token, then decode that one.
`input_pos` holds the position of each token (0 for the first).

## Load it

```python
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path="path/to/this/package/model.tflite", num_threads={target.threads or 2})  # big cores
prefill, decode = it.get_signature_runner("prefill_{longest}"), it.get_signature_runner("decode")
inputs = decode.get_input_details()
cache = {{n: np.zeros(d["shape"], d["dtype"]) for n, d in inputs.items() if n.startswith("kv_cache_")}}
lora = {{n: np.zeros(d["shape"], d["dtype"]) for n, d in inputs.items() if n.startswith("lora_")}}  # LoRA slots, if any
ids = [2, 651, 6037, 576, 6081, 603]  # the tokenized prompt (tokenizer.json), BOS first
body = ids[:-1]  # prefill writes all but the last token into the cache (at most {longest} per call; no logits)
out = prefill(tokens=np.array([body + [0] * ({longest} - len(body))], np.int32),
              input_pos=np.arange({longest}, dtype=np.int32), **cache, **lora)
cache = {{n: out[n] for n in cache}}
token, pos, generated = ids[-1], len(body), []
for _ in range(16):  # decode takes the last prompt token, then each chosen one
    out = decode(tokens=np.array([[token]], np.int32), input_pos=np.array([pos], np.int32), **cache, **lora)
    cache = {{n: out[n] for n in cache}}
    token, pos = int(out["logits"][0, 0].argmax()), pos + 1
    generated.append(token)
print(generated)
```

On Android, LiteRT (the `com.google.ai.edge.litert` AAR, XNNPACK on the CPU) runs the same
signatures; LiteRT-LM binds the `kv_cache_*` tensors by these names.{_slots(manifest)}

## Measure it

`mobilize bench <package>` prints time to first token, prefill and decode tokens/s and peak RSS on the
machine it runs on; `mobilize run <package> --prompt "..."` streams greedy text.
"""


def _slots(manifest: Manifest) -> str:
    slots = manifest.lora_slots
    if slots is None:
        return ""
    r = slots.rank
    return (
        f"\n\nLoRA slots of rank {r} on {', '.join(slots.targets)} ({slots.modules} projections): every signature "
        f"takes, besides the base model's inputs, `lora_atten_<q|k|v|o>_a_prime_weight_<layer>` [in, {r}] and "
        f"`..._b_prime_weight_<layer>` [{r}, out] (float32), the names litert-torch gives and LiteRT-LM binds; all "
        "zeros is the base model. `mobilize adapter PEFT_DIR --package THIS_DIR` writes a `.lora.tflite` for this "
        "package: those tensors, checked against these slots, in the flatbuffer LiteRT-LM loads as a LoRA file. In "
        "LiteRT-LM, give every session an adapter (`LoraConfig(lora_path=...)`, rank 16 or 32): "
        "`no-adapter.lora.tflite`, all zeros, runs the base model; a session with none leaves the inputs unset "
        "(the engine then writes `<pad>`). With the interpreter, set each tensor as the input of its name in every "
        "signature (`mobilize run THIS_DIR --adapter FILE` does)."
    )
