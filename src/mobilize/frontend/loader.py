"""Open any checkpoint source and map its tensors onto the architecture's canonical names.

`open_checkpoint` accepts a Hugging Face directory, a GGUF file or an alias (with `random_weights`,
any of them stands only for its config). `load_model` checks every tensor against the shapes the
config implies and raises naming anything missing, left over, or of the wrong shape.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from mobilize.errors import CheckpointError, ConfigError, SourceNotFoundError
from mobilize.frontend.config import DecoderConfig, expected_shapes, layer_weight_names
from mobilize.frontend.families.registry import FAMILIES, family_for_gguf, family_for_hf
from mobilize.frontend.sources import aliases
from mobilize.frontend.sources.base import Checkpoint, TensorRef
from mobilize.frontend.sources.gguf_file import GGUF_MAGIC, read_gguf
from mobilize.frontend.sources.random_weights import random_tensors
from mobilize.frontend.sources.safetensors_file import read_safetensors
from mobilize.safe_io import quoted, read_json, regular_file

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_CONFIG_BYTES = 4 * 1024 * 1024


def open_checkpoint(spec: str, random_weights: bool = False) -> Checkpoint:
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            return _open_hf_dir(path, random_weights)
        return _open_file(path, random_weights)
    if spec in aliases.ALIASES:
        if spec == aliases.BUNDLED and not random_weights:
            return _open_file(aliases.bundled_gguf(), False, source=spec)
        if random_weights:
            hf_config = dict(aliases.ALIASES[spec]["config"])
            ckpt = Checkpoint(spec, "random", family_for_hf(hf_config["model_type"]), {}, hf_config=hf_config)
            ckpt.tensors = random_tensors(config_of(ckpt))
            return ckpt
        return _open_hf_dir(aliases.resolve_cached(spec), False, source=spec)
    raise SourceNotFoundError(
        f"{spec!r} is neither a file, a directory nor a known alias (aliases: {', '.join(aliases.ALIASES)})"
    )


def _open_file(path: Path, random_weights: bool, source: str | None = None) -> Checkpoint:
    if path.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: pickle checkpoints are never loaded (they can run code); convert it to safetensors "
            "first, e.g. with transformers' save_pretrained(safe_serialization=True)"
        )
    regular_file(path, follow=True)  # a FIFO or a device would block the read below
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        if path.suffix == ".safetensors":
            raise CheckpointError(f"{path.name}: a bare .safetensors file has no config; pass its directory")
        raise CheckpointError(f"{path.name}: not a GGUF file (the first bytes are not 'GGUF') nor a model directory")
    meta, tensors = read_gguf(str(path))
    meta = meta | _tensor_facts(tensors, path.name)
    family = family_for_gguf(meta.get("general.architecture"))
    ckpt = Checkpoint(source or str(path), "gguf", family, tensors, gguf_metadata=meta, files=[str(path)])
    if random_weights:
        ckpt.tensors, ckpt.format = random_tensors(config_of(ckpt)), "random"
    return ckpt


# What llama.cpp's converter says with tensors rather than keys, as metadata keys of ours (never in a file):
TIED_HEAD = "mobilize.tied_head"  # no output.weight: llama.cpp ties the head to the embedding
ROPE_FACTORS = "mobilize.rope_factors"  # rope_freqs.weight: one divisor per rotary pair (Llama 3.1+ scaling)


# llama.cpp's rope tensors -> our metadata keys: rope_freqs (Llama 3.1+), LongRoPE's two sets (phi3)
_ROPE_TENSORS = {"rope_freqs.weight": ROPE_FACTORS, "rope_factors_short.weight": "mobilize.rope_factors_short",
                 "rope_factors_long.weight": "mobilize.rope_factors_long"}  # fmt: skip


def _tensor_facts(tensors: dict[str, TensorRef], name: str) -> dict[str, Any]:
    facts: dict[str, Any] = {TIED_HEAD: "output.weight" not in tensors}
    for tensor, key in _ROPE_TENSORS.items():
        if tensor in tensors:
            ref = tensors[tensor]
            if len(ref.shape) != 1 or ref.dtype not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"{name}: {tensor} of shape {list(ref.shape)} ({ref.dtype}) is not a vector")
            facts[key] = tuple(float(x) for x in ref.load())
    return facts


def read_config_json(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path):
        raise CheckpointError(f"{quoted(path.parent)}: no {path.name}; a Hugging Face model directory needs one")
    return read_json(path, _MAX_CONFIG_BYTES, root=path.parent)


def _open_hf_dir(path: Path, random_weights: bool, source: str | None = None) -> Checkpoint:
    hf_config = read_config_json(path / "config.json")
    family = family_for_hf(hf_config.get("model_type"))
    if random_weights:
        ckpt = Checkpoint(source or str(path), "random", family, {}, hf_config=hf_config)
        ckpt.tensors = random_tensors(config_of(ckpt))
        return ckpt
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        weight_map = read_config_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{quoted(index)}: no weight_map object")
        odd = next((v for v in weight_map.values() if not isinstance(v, str)), None)
        if odd is not None:
            raise CheckpointError(f"{quoted(index)}: shard name {repr(odd)[:60]} must be a plain file name")
        shard_names = sorted(set(weight_map.values()))
        for shard in shard_names:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name in the directory")
    else:
        shard_names = sorted(p.name for p in path.glob("*.safetensors"))
        weight_map = None
    if not shard_names:
        pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        hint = (
            f" (found {', '.join(pickles)}: pickle files are never loaded; convert to safetensors)" if pickles else ""
        )
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    tensors: dict[str, TensorRef] = {}
    files = []
    for shard in shard_names:
        shard_path = path / shard
        if not os.path.lexists(shard_path):
            raise CheckpointError(f"{index.name} names shard {quoted(shard)} but {quoted(path)} has no such file")
        regular_file(shard_path, root=path)
        for name, ref in read_safetensors(str(shard_path)).items():
            if weight_map is not None and weight_map.get(name) != shard:
                continue  # the index decides which shard owns a tensor
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard")
            tensors[name] = ref
        files.append(str(shard_path))
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index.name} lists {len(absent)} tensors its shards lack, e.g. {absent[0]!r}")
    files.append(str(path / "config.json"))
    return Checkpoint(source or str(path), "hf", family, tensors, hf_config=hf_config, files=files)


def config_of(ckpt: Checkpoint) -> DecoderConfig:
    family = FAMILIES[ckpt.family]
    try:
        if ckpt.gguf_metadata is not None:
            return family.from_gguf(ckpt.gguf_metadata)
        return family.from_hf(ckpt.hf_config or {})
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{ckpt.source}: config cannot be read: {e}") from None


# ---- tensor names ------------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Buffers some exporters save that carry nothing the config does not already say.
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$|rope_(freqs|factors_short|factors_long)\.weight$")  # (rope_*: read
# into the config)


def canonical_name(ckpt: Checkpoint, name: str) -> str | None:
    """The Hugging Face name of a source tensor (None if the source's naming scheme has no such tensor)."""
    return gguf_canonical_name(ckpt.family, name) if ckpt.format == "gguf" else name


def gguf_canonical_name(family: str, name: str) -> str | None:
    """The Hugging Face name of a tensor llama.cpp names `name` in a model of this family (None: no such tensor)."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_RE.match(name)
    table = FAMILIES[family].gguf_layer_names
    if m and m.group(2) in table:
        return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    return None


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint resolved against its config: every weight the builder needs, by canonical name,
    still lazy, in Hugging Face orientation ([out, in]) and conventions."""

    ckpt: Checkpoint
    config: DecoderConfig
    weights: dict[str, TensorRef]
    # quant/smooth.py's Smoothing where the weights were smoothed (LoRA slots put its factors back on their branch)
    smoothing: Any = None


def load_model(ckpt: Checkpoint) -> LoadedModel:
    cfg = config_of(ckpt)
    want = expected_shapes(cfg)
    fix = FAMILIES[ckpt.family].gguf_fix if ckpt.format == "gguf" else None
    weights: dict[str, TensorRef] = {}
    leftover: list[str] = []
    for src_name, name, ref in _named(ckpt, cfg, want):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # transformers ties it to the embedding and ignores the saved copy
        if name is None or name not in want:
            if not _IGNORABLE.match(src_name):
                leftover.append(src_name)
            continue
        if name in weights:  # e.g. q_proj beside a fused qkv_proj
            raise CheckpointError(f"{ckpt.source}: {name!r} is given twice (by {src_name!r} too)")
        if ref.shape != want[name]:
            raise CheckpointError(
                f"{ckpt.source}: tensor {src_name!r} has shape {list(ref.shape)} but the config implies "
                f"{list(want[name])}; the checkpoint and its config disagree"
            )
        if fix is not None:  # the same row fix applies to the raw blocks (rows are whole blocks)
            raw = _fixed(fix, cfg, name, ref.raw) if ref.raw is not None else None
            ref = dataclasses.replace(ref, name=name, load=_fixed(fix, cfg, name, ref.load), raw=raw)
        if ckpt.format != "random":
            ref = dataclasses.replace(ref, load=_finite(ckpt.source, src_name, ref.load))
        weights[name] = ref
    missing = [n for n in want if n not in weights]
    if missing:
        raise CheckpointError(
            f"{ckpt.source}: {len(missing)} tensor(s) the {cfg.family} config needs are missing, e.g. {missing[0]!r}"
        )
    if leftover:
        raise CheckpointError(
            f"{ckpt.source}: {len(leftover)} tensor(s) map to nothing in {cfg.family}, e.g. {leftover[0]!r}; "
            "is this the right architecture?"
        )
    return LoadedModel(ckpt, cfg, weights)


_LAYER_MODULE = re.compile(r"(model\.layers\.(\d+)\.)(.+)$")


def fused_parts(cfg: DecoderConfig, module: str) -> list[tuple[str, slice]] | None:
    """For a family's fused projection (phi3's `model.layers.3.self_attn.qkv_proj`), the canonical modules its rows
    hold and their rows, in order; None for any other module."""
    m = _LAYER_MODULE.match(module)
    parts = FAMILIES[cfg.family].fused.get(m.group(3)) if m else None
    if not parts:
        return None
    shapes, out, start = layer_weight_names(cfg, int(m.group(2))), [], 0
    for part in parts:
        rows = shapes[f"{m.group(1)}{part}.weight"][0]
        out.append((m.group(1) + part, slice(start, start + rows)))
        start += rows
    return out


def _named(ckpt: Checkpoint, cfg: DecoderConfig, want: dict[str, tuple[int, ...]]):
    """(source name, canonical name or None, tensor), a fused projection (phi3's qkv_proj, gate_up_proj) given as
    the canonical weights its rows hold. Rows are whole blocks, so a GGUF's raw blocks split exactly too."""
    for src_name, ref in ckpt.tensors.items():
        name = canonical_name(ckpt, src_name)
        parts = fused_parts(cfg, name.removesuffix(".weight")) if name and name.endswith(".weight") else None
        if not parts:
            yield src_name, name, ref
            continue
        implied = [parts[-1][1].stop, want[parts[0][0] + ".weight"][1]]
        if list(ref.shape) != implied:
            rows = " + ".join(str(p.stop - p.start) for _, p in parts)
            raise CheckpointError(
                f"{ckpt.source}: tensor {src_name!r} has shape {list(ref.shape)} but the config implies {implied} "
                f"({rows} rows); the checkpoint and its config disagree"
            )
        for part, rows in parts:
            yield src_name, part + ".weight", ref.rows(rows, name=part + ".weight")


def _fixed(fix, cfg: DecoderConfig, name: str, load):
    return lambda: fix(cfg, name, load())


def _finite(source: str, name: str, load):
    """A weight with a NaN or an infinity would make every logit NaN: refused as it is read (one pass over it)."""

    def checked():
        w = load()
        # a float64 sum of float32s cannot overflow: it is finite exactly when every value is (and needs no copy)
        if w.dtype.kind == "f" and not math.isfinite(float(w.sum(dtype=np.float64))):
            raise CheckpointError(f"{quoted(source)}: tensor {quoted(name)} holds NaN or infinite values")
        return w

    return checked
