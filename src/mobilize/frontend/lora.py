"""LoRA adapters as the `peft` library writes them (`adapter_config.json` + `adapter_model.safetensors`), read
against a loaded model and checked tensor by tensor, then merged into its weights before any quantization.

Every low-rank pair must land on a weight of this model with the rank its config gives, every module the
config's `target_modules` names must have its pair, and nothing may be left over: an adapter that "loads but has
no effect" is the failure this module exists to prevent, so any mismatch is one error line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from mobilize.errors import CheckpointError
from mobilize.frontend.config import expected_shapes, layer_weight_names
from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.loader import fused_parts, gguf_canonical_name
from mobilize.frontend.sources.base import TensorRef
from mobilize.frontend.sources.gguf_file import GGUF_MAGIC, read_gguf
from mobilize.frontend.sources.safetensors_file import read_safetensors
from mobilize.manifest import LoraSlots
from mobilize.safe_io import quoted, read_json, regular_file, sha256_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING = "model.embed_tokens"
# How a PEFT file names a module: the base model's path, under peft's wrapper (and, for Gemma 3's
# multimodal class, under its language model); the vision tower's modules are not in a text package.
_WRAPPER = "base_model.model."
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."))
_NOT_TEXT = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")
_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[\w-]+)?\.weight$|"
                  r"(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)(?:\.[\w-]+)?$")  # fmt: skip
_UNSUPPORTED = {  # config field -> (value that is fine, why not otherwise)
    "use_dora": (False, "DoRA's magnitude vectors are not supported; merge it with peft's merge_and_unload first"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D layers) is not used by any family mobilize builds"),
    "bias": ("none", "adapters that train biases are not supported (bias must be 'none')"),
    "lora_bias": (False, "lora_bias (a bias on lora_B) is not supported"),
    # peft's LoRA variants, each a different forward: refused when set, never merged as if plain
    **{
        key: (None, f"{key} (a LoRA variant) is not supported")
        for key in (
            "layer_replication",
            "alora_invocation_tokens",
            "trainable_token_indices",
            "use_qalora",
            "use_bdlora",
            "arrow_config",
            "kasa_config",
            "velora_config",
            "monteclora_config",
        )
    },
}
_MAX_RANK = 4096
# initialisations after which the adapter only works on a base peft changed too (unless converted)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")
MAX_SLOT_RANK = 256


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """One module's low-rank update: weight += scale * B @ A (an embedding's: += scale * (B @ A).T)."""

    module: str  # the canonical module name, e.g. "model.layers.0.self_attn.q_proj"
    a: TensorRef  # [rank, in] (an embedding's: [rank, vocab])
    b: TensorRef  # [out, rank] (an embedding's: [hidden, rank])
    scale: float

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        d = self.b.load().astype(np.float32) @ self.a.load().astype(np.float32)
        d *= np.float32(self.scale)
        return np.ascontiguousarray(d.T) if self.module == EMBEDDING else d


@dataclasses.dataclass(frozen=True)
class Adapter:
    path: Path
    sha256: str  # of adapter_model.safetensors (a GGUF's: the file): the manifest records it, eval checks it again
    rank: int
    alpha: float
    rslora: bool
    pairs: tuple[LoraPair, ...]
    files: tuple[Path, ...] = ()  # what was read
    format: str = "peft"  # or "gguf": llama.cpp's LoRA file (convert_lora_to_gguf.py)

    def record(self) -> dict[str, Any]:
        """What the manifest says about an adapter merged into the package."""
        return {
            "path": str(self.path), "sha256": self.sha256, "rank": self.rank, "alpha": self.alpha,
            "rslora": self.rslora, "modules": len(self.pairs),
            "targets": sorted({p.module.rsplit(".", 1)[-1] for p in self.pairs}),
        } | ({"format": self.format} if self.format != "peft" else {})  # fmt: skip


def read_adapter(path: str | Path, cfg, shapes: dict[str, tuple[int, ...]]) -> Adapter:
    """A PEFT LoRA directory, or a llama.cpp GGUF LoRA file, checked against a model's config and weight shapes
    (canonical names)."""
    root = Path(path)
    if root.is_file() and _starts_with(root, GGUF_MAGIC):
        return _read_gguf_adapter(root, cfg, shapes)
    if not root.is_dir():
        hint = f" (pass its directory, {quoted(root.parent)})" if root.name in (CONFIG, WEIGHTS) else ""
        raise CheckpointError(f"--lora {quoted(root)}: not a PEFT adapter directory nor a GGUF LoRA file{hint}")
    where = f"adapter {quoted(root)}"
    conf = read_json(root / CONFIG, root=root) if (root / CONFIG).exists() else None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: no {CONFIG} object (peft's save_pretrained writes one)")
    if conf.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {quoted(conf.get('peft_type'))} is not LORA")
    for key, (fine, why) in _UNSUPPORTED.items():
        if conf.get(key, fine) not in (fine, None, False, {}, []):
            raise CheckpointError(f"{where}: {why}")
    if conf.get("modules_to_save"):
        raise CheckpointError(f"{where}: modules_to_save {conf['modules_to_save']!r} (whole trained copies of "
                              "modules) is not supported; only low-rank pairs are merged")  # fmt: skip
    if conf.get("target_parameters"):
        raise CheckpointError(f"{where}: target_parameters (LoRA on raw parameters) is not supported")
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(f"{where}: init_lora_weights {quoted(init)} changes the base model's weights too; "
                              "convert it to a plain LoRA with peft first (its docs: path_initial_model_for_weight_"
                              "conversion)")  # fmt: skip
    _check_module_fields(conf, where)
    rank, alpha = _number(conf, "r", where, integer=True), _number(conf, "lora_alpha", where)
    rslora = conf.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{where}: use_rslora must be true or false, not {rslora!r}")
    rank_pattern, alpha_pattern = _patterns(conf, "rank_pattern", where), _patterns(conf, "alpha_pattern", where)

    weights = root / WEIGHTS
    if not weights.exists():
        other = sorted(p.name for p in root.glob("adapter_model.*"))
        hint = f" (found {', '.join(other)}: pickle files are never loaded)" if other else ""
        raise CheckpointError(f"{where}: no {WEIGHTS}{hint}")
    regular_file(weights, root=root)
    halves: dict[str, dict[str, TensorRef]] = {}
    prefix = "model."  # how the file names the text model's modules (Gemma 3's multimodal class differs)
    for key, ref in read_safetensors(str(weights)).items():
        m = _KEY.match(key)
        if m is None:
            raise CheckpointError(f"{where}: tensor {quoted(key)} is not a LoRA A or B matrix")
        original = (m.group("module") or m.group("emodule")).removeprefix(_WRAPPER)
        module = _canonical(original)
        if module is not None and module.startswith("model.") and not original.startswith("model.layers."):
            prefix = original[: len(original) - len(module) + len("model.")]
        if module is None:
            continue  # the vision tower's: not part of a text package
        part = (m.group("part") or m.group("epart"))[-1]
        if (module == EMBEDDING) != bool(m.group("epart")):
            raise CheckpointError(f"{where}: tensor {quoted(key)}: embeddings use lora_embedding_A/B, linears lora_A/B")
        if part in halves.setdefault(module, {}):
            raise CheckpointError(f"{where}: module {quoted(module)} has two lora_{part} tensors")
        if len(ref.shape) != 2 or ref.dtype not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{where}: tensor {quoted(key)} is {ref.dtype} {list(ref.shape)}, not a float matrix")
        halves[module][part] = ref

    shapes = shapes | _fused_shapes(cfg, shapes)

    def peft_name(module: str) -> str:  # the name peft matched the config's patterns against
        return prefix + module.removeprefix("model.") if module.startswith("model.") else module

    try:
        targets = [m for m in _modules(cfg) if _targeted(conf, peft_name(m))]
        ranks = {m: _pattern_value(rank_pattern, peft_name(m), rank) for m in halves}
        alphas = {m: _pattern_value(alpha_pattern, peft_name(m), alpha) for m in halves}
    except re.error as e:
        raise CheckpointError(f"{where}: a module pattern in {CONFIG} is not a regular expression ({e})") from None
    missing = [m for m in targets if m not in halves]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} module(s) its target_modules name have no LoRA weights, e.g. "
                              f"{quoted(missing[0])}; the file does not match its config")  # fmt: skip
    pairs = []
    for module, ab in sorted(halves.items(), key=lambda kv: _order(kv[0])):
        _known_module(where, cfg, shapes, module)
        if module not in targets:
            raise CheckpointError(f"{where}: module {quoted(module)} has LoRA weights but its target_modules do not "
                                  "name it; the file does not match its config")  # fmt: skip
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{where}: module {quoted(module)} has lora_{''.join(ab)} but not its other half")
        r = ranks[module]
        if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= _MAX_RANK:
            raise CheckpointError(f"{where}: rank_pattern gives {quoted(module)} the rank {r!r}: not a positive int")
        scale = alphas[module] / (math.sqrt(r) if rslora else r)
        pairs += _pair(where, cfg, shapes, module, ab["A"], ab["B"], r, scale)
    return _adapter(where, root, (root / CONFIG, weights), rank, alpha, rslora, pairs)


def _known_module(where: str, cfg, shapes: dict[str, tuple[int, ...]], module: str) -> None:
    if module + ".weight" not in shapes:
        raise CheckpointError(f"{where}: module {quoted(module)} is not a weight of this {cfg.family} model; "
                              "is the adapter for another architecture?")  # fmt: skip
    if module in ("lm_head", EMBEDDING) and cfg.tie_word_embeddings:
        raise CheckpointError(f"{where}: LoRA on {module} of a model whose head is tied to its embedding is not "
                              "supported (PEFT changes one of the two; merging would change both)")  # fmt: skip


def _pair(where: str, cfg, shapes, module: str, a: TensorRef, b: TensorRef, r: int, scale: float) -> list[LoraPair]:
    """One module's checked pair (a fused projection's: one per weight its rows hold)."""
    out, inp = shapes[module + ".weight"]
    if module == EMBEDDING:
        out, inp = inp, out  # lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]
    if a.shape != (r, inp) or b.shape != (out, r):
        raise CheckpointError(
            f"{where}: module {quoted(module)}: A {list(a.shape)} and B {list(b.shape)} do not fit rank {r} on a "
            f"weight of {list(shapes[module + '.weight'])} (expected A {[r, inp]}, B {[out, r]}); is it for another "
            "base model?"
        )
    return _split(cfg, LoraPair(module, a, b, scale))


def _adapter(where, path: Path, files, rank: int, alpha: float, rslora: bool, pairs, fmt: str = "peft") -> Adapter:
    if not pairs:
        raise CheckpointError(f"{where}: no LoRA weights for this model")
    if all(not p.b.load().any() or p.scale == 0 for p in pairs):
        raise CheckpointError(f"{where}: every lora_B is zero (or every scale): an untrained adapter, which would "
                              "change nothing")  # fmt: skip
    digest = sha256_file(files[-1])  # the weights (a GGUF: the file)
    return Adapter(path.resolve(), digest, rank, alpha, rslora, tuple(pairs), tuple(files), fmt)


# llama.cpp's architecture names a family's adapters may carry besides its own (its converter writes Mistral as llama)
_GGUF_ARCH_ALIASES = {"mistral": ("llama",)}
_GGUF_PAIR = re.compile(r"(?P<weight>.+\.weight)\.lora_(?P<part>[ab])$")


def _read_gguf_adapter(path: Path, cfg, shapes: dict[str, tuple[int, ...]]) -> Adapter:
    """llama.cpp's LoRA file (convert_lora_to_gguf.py): `blk.N.attn_q.weight.lora_a` [rank, in] and `.lora_b`
    [out, rank] under llama.cpp's tensor names and row order (q/k rows interleaved for llama), scaled as llama.cpp
    scales them: adapter.lora.alpha / rank, or 1 where alpha is 0 (it stores no rsLoRA flag)."""
    where = f"adapter {quoted(path)}"
    meta, tensors = read_gguf(str(path))
    kind, adapter_type = meta.get("general.type", "model"), meta.get("adapter.type")
    if (kind, adapter_type) != ("adapter", "lora"):
        what = f"a GGUF {str(kind)[:40]}" + (f" of type {str(adapter_type)[:40]!r}" if adapter_type else "")
        raise CheckpointError(f"{where}: {what}, not a LoRA adapter (llama.cpp's LoRA files have general.type "
                              "'adapter' and adapter.type 'lora')")  # fmt: skip
    if "adapter.alora.invocation_tokens" in meta:
        raise CheckpointError(f"{where}: an aLoRA (active only after its invocation tokens: a LoRA variant) is not "
                              "supported")  # fmt: skip
    arch, ours = meta.get("general.architecture"), FAMILIES[cfg.family]
    if arch != ours.gguf_arch and arch not in _GGUF_ARCH_ALIASES.get(cfg.family, ()):
        raise CheckpointError(f"{where}: made for a {str(arch)[:40]!r} model (general.architecture), not this "
                              f"{cfg.family} one")  # fmt: skip
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise CheckpointError(f"{where}: adapter.lora.alpha {alpha!r} is not a finite number of zero or more")
    linear = set(_modules(cfg)) - {EMBEDDING}
    halves: dict[str, dict[str, TensorRef]] = {}
    for key, ref in tensors.items():
        m = _GGUF_PAIR.match(key)
        if m is None:
            raise CheckpointError(f"{where}: tensor {quoted(key)} is not a LoRA a or b matrix")
        weight = gguf_canonical_name(cfg.family, m.group("weight"))
        if weight is None:
            raise CheckpointError(f"{where}: tensor {quoted(key)} is not on a weight of a {cfg.family} model")
        module = weight.removesuffix(".weight")
        if module == EMBEDDING:
            raise CheckpointError(f"{where}: LoRA on the token embedding ({quoted(key)}) is not supported from GGUF")
        if module not in linear:
            raise CheckpointError(f"{where}: tensor {quoted(key)} is on {quoted(weight)}, not a linear layer a LoRA "
                                  "adapts")  # fmt: skip
        if len(ref.shape) != 2:
            raise CheckpointError(f"{where}: tensor {quoted(key)} has shape {list(ref.shape)}, not a matrix")
        halves.setdefault(module, {})[m.group("part")] = ref
    fix, shapes = ours.gguf_fix, shapes | _fused_shapes(cfg, shapes)
    pairs, ranks = [], set()
    for module, ab in sorted(halves.items(), key=lambda kv: _order(kv[0])):
        _known_module(where, cfg, shapes, module)
        if set(ab) != {"a", "b"}:
            raise CheckpointError(f"{where}: module {quoted(module)} has lora_{''.join(ab)} but not its other half")
        a, b = ab["a"], ab["b"]
        r = a.shape[0]
        if not 0 < r <= _MAX_RANK:
            raise CheckpointError(f"{where}: module {quoted(module)} has rank {r} (1 to {_MAX_RANK})")
        name = module + ".weight"  # llama.cpp's row order -> transformers' (B's rows are the weight's)
        b = dataclasses.replace(b, load=lambda b=b, name=name: fix(cfg, name, b.load().astype(np.float32)), raw=None)
        ranks.add(r)
        pairs += _pair(where, cfg, shapes, module, a, b, r, alpha / r if alpha else 1.0)
    return _adapter(where, path, (path,), max(ranks, default=0), float(alpha), False, pairs, "gguf")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def merge(model, adapters: list[Adapter]):
    """The model with every adapter's update added to its weights (lazily, in float32; one tensor at a time).
    A merged weight is no longer on its source's quantization grid: its blocks are re-rounded, not carried, at
    the precision the source's type allowed the base (a 6-bit GGUF tensor is not squeezed into 4 bits)."""
    return merge_deltas(model, [(p.weight, p.delta) for a in adapters for p in a.pairs])


def merge_deltas(model, deltas: list[tuple[str, Any]]):
    """The model with each (weight name, () -> [out, in] update) added, in turn, lazily."""
    weights = dict(model.weights)
    for name, delta in deltas:
        weights[name] = _merged(weights[name], name, delta)
    return dataclasses.replace(model, weights=weights)


def apply_adapters(model, paths: list[str | Path], expected: list[dict] | None = None):
    """Read and merge adapters named by path; with `expected` (a manifest's records), each file must be the one
    that was merged then."""
    shapes = expected_shapes(model.config)
    adapters = [read_adapter(p, model.config, shapes) for p in paths]
    for adapter, record in zip(adapters, expected or [], strict=False):
        if adapter.sha256 != record["sha256"]:
            raise CheckpointError(
                f"adapter {quoted(adapter.path)} changed since the package was exported "
                f"(sha256 {adapter.sha256[:12]}, the manifest has {record['sha256'][:12]})"
            )
    return merge(model, adapters), adapters


def _merged(ref: TensorRef, name: str, delta) -> TensorRef:
    def load() -> np.ndarray:
        w = ref.load().astype(np.float32, copy=True)
        w += delta()
        if not np.isfinite(w).all():
            raise CheckpointError(f"LoRA on {quoted(name)} gives NaN or infinite weights")
        return w

    # The source's type stays (a GGUF's Q6_K says the planner may keep 8 bits, as it would for the base); its raw
    # blocks go: the values are no longer on the source's grid.
    return dataclasses.replace(ref, load=load, raw=None, altered="a LoRA merged")


def _fused_shapes(cfg, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """[out, in] of the family's fused projections (phi3's qkv_proj: the rows of q, k and v)."""
    out = {}
    for i in range(cfg.num_layers):
        for fused in FAMILIES[cfg.family].fused:
            parts = fused_parts(cfg, f"model.layers.{i}.{fused}")
            out[f"model.layers.{i}.{fused}.weight"] = (parts[-1][1].stop, shapes[parts[0][0] + ".weight"][1])
    return out


def _split(cfg, pair: LoraPair) -> list[LoraPair]:
    """A pair on a fused projection as one pair per weight its rows hold: the same A, B's rows split (exact:
    the rows of B @ A are B's rows times A)."""
    parts = fused_parts(cfg, pair.module)
    return [LoraPair(part, pair.a, pair.b.rows(rows), pair.scale) for part, rows in parts] if parts else [pair]


def _canonical(module: str) -> str | None:
    if module.startswith(_WRAPPER):
        module = module[len(_WRAPPER) :]
    for old, new in _PREFIXES:
        if module.startswith(old):
            module = new + module[len(old) :]
    return None if module.startswith(_NOT_TEXT) else module


def _modules(cfg) -> list[str]:
    """Every module of the model a LoRA may target, in peft's naming (a family's fused projections for the
    weights they hold)."""
    fused = FAMILIES[cfg.family].fused
    held = {part for parts in fused.values() for part in parts}
    names = [EMBEDDING]
    for i in range(cfg.num_layers):
        linear = [f"{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for p in LINEAR]
        names += [f"model.layers.{i}.{m}" for m in [m for m in linear if m not in held] + list(fused)]
    return names + ["lm_head"]


def _targeted(conf: dict, key: str) -> bool:
    """peft's rule (tuners_utils.check_target_module_exists): exclude_modules first; then target_modules as a
    regular expression matched in full, a name equal to the key, or a name the key ends with (only these last obey
    layers_to_transform, an empty list meaning all layers)."""
    exclude = conf.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, key):
            return False
    elif exclude and (key in exclude or any(key.endswith("." + t) for t in exclude)):
        return False
    targets = conf.get("target_modules")
    if targets == "all-linear":
        return key.rsplit(".", 1)[-1] in LINEAR
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not targets:
        return False
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    layers = conf.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    m = re.search(r"\.layers\.(\d+)\.", key)
    return m is not None and int(m.group(1)) in ([layers] if isinstance(layers, int) else layers)


def _check_module_fields(conf: dict, where: str) -> None:
    """target_modules, exclude_modules, layers_to_transform: of the types peft takes, else one line."""
    for key in ("target_modules", "exclude_modules"):
        value = conf.get(key)
        if value is not None and not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise CheckpointError(f"{where}: {key} must be a name, a list of names or a regular expression, "
                                  f"not {repr(value)[:60]}")  # fmt: skip
    layers = conf.get("layers_to_transform")
    ints = type(layers) is int or (isinstance(layers, list) and all(type(v) is int for v in layers))
    if layers is not None and not ints:
        raise CheckpointError(f"{where}: layers_to_transform must be a layer index or a list of them, "
                              f"not {repr(layers)[:60]}")  # fmt: skip


def _patterns(conf: dict, key: str, where: str) -> dict[str, float]:
    value = conf.get(key) or {}
    if not isinstance(value, dict) or any(
        isinstance(v, bool) or not isinstance(v, int | float) for v in value.values()
    ):
        raise CheckpointError(f"{where}: {key} must map module patterns to numbers")
    return value


def _pattern_value(patterns: dict[str, float], module: str, default: float):
    for pattern, value in patterns.items():  # peft: the first key that matches the module's name as a suffix
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _number(conf: dict, key: str, where: str, integer: bool = False):
    value = conf.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not 0 < value <= (_MAX_RANK if integer else 1e6) or value != value:
        raise CheckpointError(
            f"{where}: {key} = {value!r} in {CONFIG} is not a positive {'integer' if integer else 'number'}"
        )
    return value


def _order(module: str) -> tuple:
    m = re.search(r"\.layers\.(\d+)\.", module)
    return (int(m.group(1)) if m else -1, module)


@dataclasses.dataclass(frozen=True)
class Slots:
    """A package's LoRA slots: each targeted projection takes `x @ A @ B` added to its output, with A [in, r] and
    B [r, out] given at run time (an adapter's scale folded into B; a smaller rank padded with zeros to `rank`)."""

    rank: int
    targets: tuple[str, ...]  # short module names: q_proj, v_proj, ...

    def modules(self, cfg) -> dict[str, tuple[int, int]]:
        """module -> (in, out) of every slot."""
        found = {}
        for i in range(cfg.num_layers):
            for name, shape in layer_weight_names(cfg, i).items():
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module.rsplit(".", 1)[-1] in self.targets:
                    found[module] = (shape[1], shape[0])
        return found

    def record(self, cfg) -> LoraSlots:
        return LoraSlots(self.rank, tuple(self.targets), len(self.modules(cfg)))


def slot_inputs(module: str) -> tuple[str, str]:
    """The graph input (ONNX) or signature input (TFLite) names of a slot's A and B."""
    return f"{module}.lora_A", f"{module}.lora_B"


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora-targets "q,v" or "q_proj,v_proj" -> ("q_proj", "v_proj"), checked."""
    short = {m.split("_")[0]: m for m in LINEAR}
    names = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for t in names:
        module = short.get(t, t)
        if module not in LINEAR:
            raise CheckpointError(f"--lora-targets: {quoted(t)} is not a projection (known: {', '.join(LINEAR)})")
        if module not in out:
            out.append(module)
    if not out:
        raise CheckpointError("--lora-targets names no projection")
    return tuple(sorted(out, key=LINEAR.index))
