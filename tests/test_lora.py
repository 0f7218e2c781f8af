"""LoRA adapters written by peft, merged at export (`--lora`): every family's tiny checkpoint, in both formats,
gives the logits of transformers running the base with peft's adapter (1e-4, fp32); a GGUF base takes an adapter
trained on its Hugging Face original; eval's reference applies the adapter; every mismatch is one error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_one_line_error,
    assert_tracks_reference,
    cli,
    peft_targets,
    with_word_tokenizer,
    write_peft_adapter,
)

from mobilize.frontend.families.registry import FAMILIES
from mobilize.harness.package import Package
from mobilize.harness.reference import ReferenceRunner

PROMPT = [3, 17, 99, 5, 64, 1, 42]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _export(src, out, *adapters, fmt="onnx", quant="fp32", extra=()) -> Path:
    lora = [a for adapter in adapters for a in ("--lora", adapter)]
    r = cli("export", src, "-o", out, "-t", "host", "-f", fmt, "-q", quant, "--max-seq-len", "64", *lora, *extra)
    assert r.returncode == 0, r.stderr
    return Path(out)


@pytest.fixture(scope="module")
def adapters(tiny_hf, tmp_path_factory):
    made: dict[tuple, Path] = {}

    def get(family: str, targets=tuple(ALL), seed: int = 1, **config) -> Path:
        key = (family, tuple(targets), seed, json.dumps(config, sort_keys=True))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{family}_lora")
            made[key] = write_peft_adapter(tiny_hf(family), out, peft_targets(family, targets), seed=seed, **config)
        return made[key]

    return get


CASES = [(f, "onnx") for f in FAMILIES] + [(f, "tflite") for f in FAMILIES]
FAST = {("llama", "onnx"), ("gemma3", "tflite")}  # the others in the full run


@pytest.mark.parametrize(
    ("family", "fmt"), [c if c in FAST else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
    ids=[f"{f}-{k}" for f, k in CASES],
)  # fmt: skip
def test_merged_matches_peft(family, fmt, tiny_hf, adapters, tmp_path):
    adapter = adapters(family)
    pkg = _export(tiny_hf(family), tmp_path / "pkg", adapter, fmt=fmt)
    ref = ReferenceRunner(tiny_hf(family), adapters=[adapter])
    base = ReferenceRunner(tiny_hf(family)).prefill(PROMPT)
    assert np.abs(ref.prefill(PROMPT) - base).max() > 0.1  # the adapter changes the model visibly
    assert_tracks_reference(ref, Package.open(pkg).runner(), PROMPT)
    record = json.loads((pkg / "manifest.json").read_text())["source"]["adapters"]
    assert [(a["rank"], a["modules"], a["targets"]) for a in record] == [
        (4, 7 * FAMILIES[family].tiny().num_layers, sorted(ALL))
    ]


def test_rslora_rank_pattern_and_two_adapters(tiny_hf, adapters, tmp_path):
    """rsLoRA's alpha/sqrt(r), a per-module rank and alpha, some layers only; two adapters merged in turn."""
    src = tiny_hf("qwen3")
    first = adapters("qwen3", ("q_proj", "v_proj", "up_proj"), seed=2, use_rslora=True,
                     rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3.0}, layers_to_transform=[1])  # fmt: skip
    second = adapters("qwen3", ("o_proj", "down_proj"), seed=3)
    pkg = _export(src, tmp_path / "pkg", first, second)
    assert_tracks_reference(ReferenceRunner(src, adapters=[first, second]), Package.open(pkg).runner(), PROMPT)


def test_multimodal_names(tiny_hf, adapters, tmp_path):
    """An adapter saved from Gemma 3's multimodal class (model.language_model.*, a vision tower's pairs beside) with a
    regular expression for target_modules, as peft matched it there: the same merge as the text model's names."""
    from safetensors.numpy import load_file, save_file

    src, plain = tiny_hf("gemma3"), adapters("gemma3", ("q_proj", "v_proj"))
    out = tmp_path / "mm"
    out.mkdir()
    tensors = load_file(plain / "adapter_model.safetensors")
    renamed = {
        k.replace("base_model.model.model.", "base_model.model.model.language_model."): v for k, v in tensors.items()
    }
    renamed["base_model.model.model.vision_tower.encoder.layers.0.q_proj.lora_A.weight"] = np.ones((4, 8), np.float32)
    save_file(renamed, out / "adapter_model.safetensors")
    conf = json.loads((plain / "adapter_config.json").read_text())
    conf["target_modules"] = r".*language_model.*\.(q|v)_proj"
    conf["alpha_pattern"] = {"model.language_model.layers.1.self_attn.q_proj": 2.0}  # a full name, as peft saw it
    (out / "adapter_config.json").write_text(json.dumps(conf))
    pkg = _export(src, tmp_path / "pkg", out)
    reference = tmp_path / "ref"
    shutil.copytree(plain, reference)
    conf_ref = json.loads((plain / "adapter_config.json").read_text())
    conf_ref["alpha_pattern"] = {"model.layers.1.self_attn.q_proj": 2.0}
    (reference / "adapter_config.json").write_text(json.dumps(conf_ref))
    assert_tracks_reference(ReferenceRunner(src, adapters=[reference]), Package.open(pkg).runner(), PROMPT)


def test_gguf_base(tiny_hf, tiny_gguf, adapters, tmp_path):
    """An adapter trained on the Hugging Face checkpoint, merged into its GGUF (llama.cpp's q/k row order)."""
    adapter = adapters("llama")
    pkg = _export(tiny_gguf("llama"), tmp_path / "pkg", adapter)
    assert_tracks_reference(ReferenceRunner(tiny_hf("llama"), adapters=[adapter]), Package.open(pkg).runner(), PROMPT)


def test_int8_merges_before_quantizing(tiny_hf, adapters, tmp_path):
    """Quantized, the merged package tracks the adapted model, not the base."""
    src, adapter = tiny_hf("gemma3"), adapters("gemma3")
    ours = Package.open(_export(src, tmp_path / "pkg", adapter, quant="int8")).runner().prefill(PROMPT)[-1]
    adapted = ReferenceRunner(src, adapters=[adapter]).prefill(PROMPT)[-1]
    base = ReferenceRunner(src).prefill(PROMPT)[-1]
    assert np.abs(ours - adapted).max() < 0.25 * np.abs(ours - base).max()


@pytest.mark.parametrize(("fmt", "quant"), [("onnx", "int4-all-cal"), ("tflite", "int4")])
def test_merged_package_is_the_base_package_but_the_adapted_weights(fmt, quant, tiny_hf, tmp_path):
    """Calibrated (scales searched; on TFLite, inputs smoothed), a package with an adapter on q and v merged stores
    every other tensor byte for byte as the base's package does: it is calibrated and smoothed on the base, so the
    fine-tune's package and the base's running the adapter in slots differ only where the adapter acts."""
    src = with_word_tokenizer(tiny_hf("llama"), tmp_path / "src", tmp_path / "text.txt", 10)
    adapter = write_peft_adapter(src, tmp_path / "peft", peft_targets("llama", ["q_proj", "v_proj"]), r=4)
    base = _tensors(_export(src, tmp_path / "base", fmt=fmt, quant=quant), fmt)
    merged_pkg = _export(src, tmp_path / "merged", adapter, fmt=fmt, quant=quant)
    merged = _tensors(merged_pkg, fmt)
    calibration = json.loads((merged_pkg / "manifest.json").read_text())["build_report"]["calibration"]
    assert calibration["used"] and "without the adapters" in calibration["model"]
    if fmt == "tflite":
        assert calibration["smoothing"]["alpha"] > 0
    adapted = ("q_proj", "v_proj")  # (ONNX fuses the base's q, k and v: those names are the base's alone)
    others = {n for n in base if not any(m in n for m in adapted)}
    assert len(others) > 10 and others <= set(merged)
    assert [n for n in sorted(others) if base[n] != merged[n]] == []
    q = [n for n in merged if "layers.0.self_attn.q_proj" in n]
    assert q and any(merged[n] != base.get(n) for n in q)


def test_merged_gguf_package_keeps_the_base_layout(tiny_hf, tmp_path):
    """A GGUF base with q, k and v in Q8_0 (int4 re-rounds them to 8-bit blocks of 128): with q and v merged, k
    keeps its grid and they do not, yet all three are re-rounded alike, so the merged package packs them into one
    MatMulNBits as the base does: the same tensor names, every tensor but the packed q/k/v byte for byte."""
    from helpers import write_tiny_gguf

    hf = tiny_hf("llama")
    q8 = {f"attn_{p}.weight": "Q8_0" for p in "qkv"}
    gguf = write_tiny_gguf(FAMILIES["llama"].tiny(), hf, tmp_path / "q8.gguf", quant=q8)
    adapter = write_peft_adapter(hf, tmp_path / "peft", peft_targets("llama", ["q_proj", "v_proj"]), r=4)
    base = _tensors(_export(gguf, tmp_path / "base", quant="int4"), "onnx")
    merged = _tensors(_export(gguf, tmp_path / "merged", adapter, quant="int4"), "onnx")
    assert set(merged) == set(base)
    packed = {n for n in base if "q_proj+k_proj+v_proj" in n}
    assert len(packed) >= 2 * FAMILIES["llama"].tiny().num_layers
    assert [n for n in sorted(base) if n not in packed and base[n] != merged[n]] == []
    assert all(base[n] != merged[n] for n in packed if n.endswith("qweight"))


def _tensors(pkg: Path, fmt: str) -> dict[str, bytes]:
    """A package's stored tensors by name: ONNX's initializers, TFLite's constant tensors (every signature's)."""
    if fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(pkg / "model.onnx"))
        return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    from ai_edge_litert import schema_py_generated as fb

    data = (pkg / "model.tflite").read_bytes()
    model = fb.ModelT.InitFromPackedBuf(bytearray(data), 0)
    out = {}
    for graph in model.subgraphs:
        for t in graph.tensors:
            b = model.buffers[t.buffer] if t.buffer else None
            if b is not None and (b.data is not None or b.size):
                stored = bytes(b.data) if b.data is not None else data[b.offset : b.offset + b.size]
                out[f"{graph.name.decode() if graph.name else ''}/{t.name.decode()}"] = stored
    return out


@pytest.mark.slow
def test_eval_reference_applies_the_adapter(tiny_hf, adapters, tmp_path):
    """`mobilize eval` compares a merged package with the base plus the adapter (both references), and refuses an
    adapter file that changed since the export."""
    import shutil

    adapter, text = tmp_path / "adapter", tmp_path / "text.txt"
    src = with_word_tokenizer(tiny_hf("llama"), tmp_path / "src", text, 80)
    shutil.copytree(adapters("llama"), adapter)
    pkg = _export(src, tmp_path / "pkg", adapter)
    for reference in ("numpy", "transformers"):
        r = cli("eval", pkg, "--text", text, "--chunk", "32", "--json", "--reference", reference)
        assert r.returncode == 0, r.stderr
        figures = json.loads(r.stdout)
        assert figures["mean_kl"] < 1e-6 and figures["top1_agreement"] == 1.0, figures
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the last value changed
    assert_one_line_error(cli("eval", pkg, "--text", text), "changed since the package was exported")


def _edit_config(adapter: Path, tmp: Path, **changes) -> Path:
    import shutil

    out = tmp / "edited"
    shutil.copytree(adapter, out)
    conf = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(conf | changes))
    return out


def _rename_tensor(adapter: Path, tmp: Path, old: str, new: str) -> Path:
    import shutil

    from safetensors.numpy import load_file, save_file

    out = tmp / "renamed"
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    key = next(k for k in tensors if old in k)
    tensors[key.replace(old, new)] = tensors.pop(key)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def _poison(adapter: Path, tmp: Path) -> Path:
    import shutil

    from safetensors.numpy import load_file, save_file

    out = tmp / "poisoned"
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = np.nan
    save_file(tensors, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("wrong base", ("do not fit rank 4", "another base model")),
        ("rank", ("do not fit rank 8",)),
        ("misnamed tensor", ("'model.layers.0.self_attn.q_prj'", "not a weight of this llama model")),
        ("missing module", ("have no LoRA weights", "'model.layers.0.self_attn.k_proj'")),
        ("unused tensor", ("'model.layers.0.mlp.down_proj'", "target_modules do not name it")),
        ("dora", ("DoRA",)),
        ("not lora", ("peft_type 'IA3' is not LORA",)),
        ("file not directory", ("not a PEFT adapter directory", "pass its directory")),
        ("no directory", ("not a PEFT adapter directory",)),
        ("bad pattern", ("not a regular expression",)),
        ("rank as text", ("r = '4'", "not a positive integer")),
        ("nan", ("NaN or infinite",)),
        ("variant", ("trainable_token_indices", "not supported")),
        ("pissa", ("init_lora_weights 'pissa'", "changes the base")),
        ("untrained", ("every lora_B is zero",)),
        ("layers as text", ("layers_to_transform must be",)),
        ("targets as number", ("target_modules must be",)),
    ],
)
def test_refused_in_one_line(case, needles, tiny_hf, adapters, tmp_path):
    good = adapters("llama", ("q_proj", "v_proj", "down_proj"))
    adapter = {
        "wrong base": lambda: adapters("gemma3", ("q_proj", "v_proj", "down_proj")),
        "rank": lambda: _edit_config(good, tmp_path, r=8),
        "misnamed tensor": lambda: _rename_tensor(
            good, tmp_path, "layers.0.self_attn.q_proj", "layers.0.self_attn.q_prj"
        ),
        "missing module": lambda: _edit_config(
            good, tmp_path, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]
        ),
        "unused tensor": lambda: _edit_config(good, tmp_path, target_modules=["q_proj", "v_proj"]),
        "dora": lambda: _edit_config(good, tmp_path, use_dora=True),
        "not lora": lambda: _edit_config(good, tmp_path, peft_type="IA3"),
        "file not directory": lambda: good / "adapter_model.safetensors",
        "no directory": lambda: tmp_path / "nothing",
        "bad pattern": lambda: _edit_config(good, tmp_path, rank_pattern={"q_proj(": 2}),
        "rank as text": lambda: _edit_config(good, tmp_path, r="4"),
        "nan": lambda: _poison(good, tmp_path),
        "variant": lambda: _edit_config(good, tmp_path, trainable_token_indices=[1, 2]),
        "pissa": lambda: _edit_config(good, tmp_path, init_lora_weights="pissa"),
        "untrained": lambda: write_peft_adapter(tiny_hf("llama"), tmp_path / "fresh", ["q_proj"], randomize=False),
        "layers as text": lambda: _edit_config(good, tmp_path, layers_to_transform="0"),
        "targets as number": lambda: _edit_config(good, tmp_path, target_modules=7),
    }[case]()
    out = tmp_path / "pkg"
    r = cli("export", tiny_hf("llama"), "-o", out, "-t", "host", "-q", "fp32", "--lora", adapter)
    assert_one_line_error(r, *needles)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("shape", [(1024, 640), (2048, 2560)])
def test_merged_gguf_weights_keep_eight_bits(kind, shape):
    """A GGUF weight with a LoRA merged has its type but not its blocks (off the grid): the int4 recipe stores it as
    the base stores its type where that is 8-bit and re-rounded anyway (same kernel, same layout), and where the base
    carries the grid exactly (a large Q4_K), at 8 bits in the grid's blocks: never squeezed to 4 (the update's steps
    are smaller than a 4-bit step)."""
    import dataclasses

    from mobilize.quant.plan import SourceGrid, plan_weight
    from mobilize.quant.recipes import RECIPES
    from mobilize.targets.onnx.caps import ONNX_CAPS
    from mobilize.targets.tflite.caps import TFLITE_CAPS

    recipe = RECIPES["int4"]
    for caps in (ONNX_CAPS, TFLITE_CAPS):
        merged = plan_weight(shape, SourceGrid.of(kind, exact=False), recipe.matmul, True, caps)
        base = plan_weight(shape, SourceGrid.of(kind), recipe.matmul, True, caps)
        assert "LoRA" not in base.note  # (the base's own form is unchanged)
        assert merged.bits == 8 and merged.source == "rounded" and "LoRA merged" in merged.note
        if base.source == "rounded":
            assert dataclasses.replace(merged, note="") == dataclasses.replace(base, note="")
        else:  # carried exactly in the base: its blocks (TFLite: per output channel, its only 8-bit form)
            assert (base.bits, caps.name, kind) in ((4, "onnx", "Q4_K"), (4, "tflite", "Q4_K"))
            assert merged.block_size == (SourceGrid.of(kind).block_size if caps.name == "onnx" else 0)
