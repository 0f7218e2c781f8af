"""LoRA slots (`export --lora-slots`): a base package whose projections take an adapter's A and B at run time, and
`mobilize adapter` converting a PEFT adapter for it. With the adapter the package gives transformers + peft's
logits (1e-4, fp32), without it the base's; ONNX Runtime GenAI's `Adapters` switches two adapters on one loaded
model; the quantized base is the same with slots as without; every mismatch is one error line."""

from __future__ import annotations

import json
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
    write_tiny_bpe,
)

from mobilize.errors import MobilizeError
from mobilize.frontend.families.registry import FAMILIES
from mobilize.harness.package import Package
from mobilize.harness.reference import ReferenceRunner
from mobilize.manifest import Manifest

PROMPT = [3, 17, 99, 5, 64, 1, 42]
ALL = "q,k,v,o,gate,up,down"
ATTENTION = "q,k,v,o"  # TFLite's slots: the projections LiteRT-LM binds LoRA inputs of
SUFFIX = {"onnx": ".onnx_adapter", "tflite": ".lora.tflite"}


def _ok(r):
    assert r.returncode == 0, r.stderr
    return r


def _export(src, out, rank=4, targets=ALL, quant="fp32", fmt="onnx") -> Path:
    _ok(cli("export", src, "-o", out, "-t", "host", "-q", quant, "--max-seq-len", "64", "--lora-slots", rank,
             "--lora-targets", targets, "-f", fmt, "--prefill-len", "4"))  # fmt: skip
    return Path(out)


def _convert(adapter, pkg, out) -> Path:
    _ok(cli("adapter", adapter, "--package", pkg, "-o", out))
    return Path(out)


FAST = ("llama", "gemma3")  # the others in the full run


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_slots_match_peft(family, fmt, tiny_hf, tmp_path):
    """The prompt runs through prefill_4 twice and decode (--prefill-len 4), the slots' inputs in each; a TFLite
    package's own no-adapter.lora.tflite (what LiteRT-LM runs its base with) gives the base model."""
    src = tiny_hf(family)
    kinds = (ALL if fmt == "onnx" else ATTENTION).split(",")
    pkg = _export(src, tmp_path / "pkg", targets=",".join(kinds), fmt=fmt)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["lora_slots"] == {"rank": 4, "targets": [f"{t}_proj" for t in kinds],
                                      "modules": len(kinds) * FAMILIES[family].tiny().num_layers}  # fmt: skip
    assert "LoRA slots of rank 4" in (pkg / "README.md").read_text()  # the app developer is told how to load one
    targets = peft_targets(family, [f"{t}_proj" for t in kinds])
    peft = write_peft_adapter(src, tmp_path / "peft", targets, r=4, rank_pattern={"o_proj": 2})  # padded to 4
    runner = Package.open(pkg).runner(adapters=[_convert(peft, pkg, tmp_path / f"a{SUFFIX[fmt]}")])
    assert_tracks_reference(ReferenceRunner(src, adapters=[peft]), runner, PROMPT)
    runner.activate(None)  # the base, on the same loaded session
    assert_tracks_reference(ReferenceRunner(src), runner, PROMPT)
    if fmt == "tflite":
        empty = Package.open(pkg).runner(adapters=[pkg / "no-adapter.lora.tflite"])
        assert_tracks_reference(ReferenceRunner(src), empty, PROMPT)
    else:
        assert not [p for p in pkg.iterdir() if "adapter" in p.name]


def _genai_generator(model, adapters, name: str | None, prompt: list[int], max_length: int):
    """A greedy ONNX Runtime GenAI generator with adapter `name` active (None: none), the prompt appended."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    if name:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(prompt)
    return gen


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_genai_adapter_logits_match_peft(family, tiny_hf, tmp_path):
    """ONNX Runtime GenAI on an fp32 slots package (all seven projections), the converted PEFT adapter loaded through
    og.Adapters and made active: its logits after the prompt and after each of 4 greedy steps are transformers +
    peft's to 1e-4; with no adapter active, the base model's."""
    import onnxruntime_genai as og

    src = tiny_hf(family)
    pkg = _export(src, tmp_path / "pkg")
    peft = write_peft_adapter(src, tmp_path / "peft", peft_targets(family, [f"{t}_proj" for t in ALL.split(",")]))
    model = og.Model(str(pkg))
    adapters = og.Adapters(model)
    adapters.load(str(_convert(peft, pkg, tmp_path / "a.onnx_adapter")), "a")
    max_length = json.loads((pkg / "genai_config.json").read_text())["search"]["max_length"]
    for name, reference in (("a", ReferenceRunner(src, adapters=[peft])), (None, ReferenceRunner(src))):
        gen = _genai_generator(model, adapters, name, PROMPT, max_length)
        expected = np.atleast_2d(reference.prefill(PROMPT))[-1]
        for _ in range(4):
            np.testing.assert_allclose(np.asarray(gen.get_logits()).reshape(-1), expected, atol=1e-4, rtol=0)
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            assert token == int(expected.argmax())
            expected = reference.decode(token).reshape(-1)


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_litert_lm_scores_match_peft(family, tmp_path):
    """LiteRT-LM's own engine on a TFLite fp32 slots package's bundle (rank 16, the engine's smallest; the adapter's
    rank 8 padded), scoring a target text after a prompt: with the converted PEFT adapter, transformers + peft's
    log-probabilities to 1e-4; with the package's no-adapter.lora.tflite, the base model's.

    LiteRT-LM 0.18.1's `run_text_scoring` feeds the prompt's last token again, one position early, over the
    previous token's cache entry (measured: its scores are exactly ours for the context p[:-2] + [p[-1]]); so the
    prompt's last token is prefilled a second time, as its own text, which puts it where the scoring expects it."""
    import litert_lm

    from mobilize.driver import ExportOptions, export

    src = write_tiny_bpe(family, tmp_path / "src")
    pkg = export(ExportOptions(str(src), tmp_path / "pkg", target="host", format="tflite", quant="fp32",
                               max_seq_len=64, prefill_lens=(8,), bundle="litertlm", lora_slots=16,
                               lora_targets=ATTENTION))  # fmt: skip
    peft = write_peft_adapter(src, tmp_path / "peft", peft_targets(family, [f"{t}_proj" for t in "qkvo"]), r=8)
    adapter = _convert(peft, pkg, tmp_path / "a.lora.tflite")
    tok = Package.open(pkg).tokenizer()
    prompt, target = "The river runs", " past the old mill and on to the sea"
    ids, wanted = tok.encode(prompt).ids, tok.encode(target, add_special_tokens=False).ids
    last = tok.decode(ids[-1:])
    assert tok.encode(last, add_special_tokens=False).ids == ids[-1:]  # (the workaround needs it to round-trip)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    (tmp_path / "cache").mkdir()
    for lora, reference in ((adapter, ReferenceRunner(src, adapters=[peft])),
                            (pkg / "no-adapter.lora.tflite", ReferenceRunner(src))):  # fmt: skip
        engine = litert_lm.Engine(str(pkg / "model.litertlm"), backend=litert_lm.Backend.CPU(thread_count=2),
                                  cache_dir=str(tmp_path / "cache"),
                                  activation_data_type=litert_lm.ActivationDataType.FLOAT32)  # fmt: skip
        session = engine.create_session(apply_prompt_template=False,
                                        lora_config=litert_lm.LoraConfig(lora_path=str(lora)))  # fmt: skip
        try:
            session.run_prefill([prompt, last])
            got = np.asarray(session.run_text_scoring([target]).token_scores[0], dtype=np.float64)
        finally:
            session.close()
            engine.close()
        logits = np.asarray(reference.prefill(ids + wanted), dtype=np.float64)[len(ids) - 1 : -1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        expected = logp[np.arange(len(wanted)), wanted]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # (the fast subset keeps under 3 minutes; CI runs it)
def test_genai_switches_adapters(tiny_hf, tmp_path):
    """Two adapters loaded by onnxruntime_genai.Adapters on one model, switched between generations: each gives
    the tokens mobilize's runner gives with it, the base its own, and the two differ. The second covers one of the
    three slots (the others get zeros of the slot rank: one `lora_rank` dimension is shared by all)."""
    import onnxruntime_genai as og

    src = tiny_hf("gemma3")
    pkg = _export(src, tmp_path / "pkg", targets="q,v,down")
    files = {}
    for seed, targets in ((1, ["q_proj", "v_proj", "down_proj"]), (2, ["q_proj"])):  # the second leaves slots empty
        peft = write_peft_adapter(src, tmp_path / f"peft{seed}", targets, seed=seed)
        files[f"a{seed}"] = _convert(peft, pkg, tmp_path / f"a{seed}.onnx_adapter")
    model = og.Model(str(pkg))
    adapters = og.Adapters(model)
    for name, path in files.items():
        adapters.load(str(path), name)
    max_length = json.loads((pkg / "genai_config.json").read_text())["search"]["max_length"]
    prompt = list(range(1, 20))

    def genai(name):
        gen = _genai_generator(model, adapters, name, prompt, max_length)
        out = []
        while not gen.is_done() and len(out) < 16:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    runner = Package.open(pkg).runner(adapters=list(files.values()))

    def ours(name):
        runner.activate(name)
        out = [int(runner.prefill(prompt)[-1].argmax())]
        while len(out) < 16:
            out.append(int(runner.decode(out[-1]).argmax()))
        return out

    got = {name: genai(name) for name in ("a1", None, "a2", "a1")}
    assert got == {name: ours(name) for name in ("a1", None, "a2")}
    assert len({tuple(v) for v in got.values()}) == 3


def test_slots_leave_the_quantized_base_alone(tiny_hf, tmp_path):
    """int4 with slots, run without an adapter, is the int4 package without slots: the passes fused and quantized
    the same, and no pass touched a slot."""
    src = tiny_hf("qwen3")
    with_slots = _export(src, tmp_path / "slots", quant="int4")
    _ok(cli("export", src, "-o", tmp_path / "plain", "-t", "host", "-q", "int4", "--max-seq-len", "64"))
    reports = [json.loads((p / "manifest.json").read_text())["build_report"]["passes"]
               for p in (with_slots, tmp_path / "plain")]  # fmt: skip
    assert [(r["pass"], r["matched"]) for r in reports[0]] == [(r["pass"], r["matched"]) for r in reports[1]]
    a = Package.open(with_slots).runner().prefill(PROMPT)
    b = Package.open(tmp_path / "plain").runner().prefill(PROMPT)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def _half_adapter(like: Path, pkg: Path, out: Path) -> None:
    """An adapter file for `pkg` with one slot's A and no B."""
    import onnxruntime as ort

    from mobilize.package.adapter import base_version

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(base_version(Manifest.read(pkg)))
    k = FAMILIES["llama"].tiny().hidden_size
    a = np.zeros((k, 4), np.float32)
    fmt.set_parameters({"model.layers.0.self_attn.q_proj.lora_A": ort.OrtValue.ortvalue_from_numpy(a)})
    fmt.export_adapter(str(out))


@pytest.mark.slow  # (the fast subset keeps under 3 minutes; CI runs it)
def test_refused_in_one_line(tiny_hf, tmp_path):
    src = tiny_hf("llama")
    pkg = _export(src, tmp_path / "pkg", rank=4, targets="q,v")
    other = _export(src, tmp_path / "other", rank=4, targets="q,v,o")
    good = write_peft_adapter(src, tmp_path / "good", ["q_proj", "v_proj"])
    wrong_base = _convert(good, other, tmp_path / "other.onnx_adapter")
    assert_one_line_error(cli("run", pkg, "-p", "x", "--adapter", wrong_base), "made for another package")
    big = write_peft_adapter(src, tmp_path / "big", ["q_proj", "v_proj"], r=8)
    assert_one_line_error(cli("adapter", big, "--package", pkg), "rank 8", "slot rank 4", "--lora-slots 8")
    no_slot = write_peft_adapter(src, tmp_path / "noslot", ["q_proj", "o_proj"])
    assert_one_line_error(cli("adapter", no_slot, "--package", pkg), "'model.layers.0.self_attn.o_proj' has no slot")
    assert_one_line_error(cli("adapter", good, "--package", tmp_path / "nothing"))
    junk = tmp_path / "junk.onnx_adapter"
    junk.write_bytes(b"not an adapter at all")
    assert_one_line_error(cli("run", pkg, "-p", "x", "--adapter", junk), "not an ONNX Runtime adapter file")
    plain = tmp_path / "plain"
    _ok(cli("export", src, "-o", plain, "-t", "host", "-q", "fp32", "--max-seq-len", "64"))
    assert_one_line_error(cli("adapter", good, "--package", plain), "has no LoRA slots", "--lora-slots")
    out = tmp_path / "tfl"
    r = cli("export", src, "-o", out, "-t", "host", "-f", "tflite", "--lora-slots", "4", "--lora-targets", "q,up")
    assert_one_line_error(r, "--lora-targets up_proj", "attention projections only", "LiteRT-LM")
    assert_one_line_error(cli("export", src, "-o", out, "--lora-slots", "4", "--lora-targets", "q,x"), "'x' is not")
    assert_one_line_error(cli("export", src, "-o", out, "--lora-slots", "0"), "a rank from 1")
    assert_one_line_error(cli("export", src, "-o", out, "--lora-targets", "q,k"), "give that too")
    half = tmp_path / "half.onnx_adapter"
    _half_adapter(wrong_base, pkg, half)
    assert_one_line_error(cli("eval", pkg, "--adapter", half), "comes without")
    existing = tmp_path / "a.onnx_adapter"
    existing.write_bytes(b"keep me")
    assert_one_line_error(cli("adapter", good, "--package", pkg, "-o", existing), "exists")
    assert existing.read_bytes() == b"keep me" and not out.exists()


@pytest.mark.slow  # (the fast subset keeps under 3 minutes; CI runs it)
def test_eval_and_bench_with_an_adapter(tiny_hf, tmp_path):
    """eval --adapter: the package with the adapter against the reference with it merged (agrees: KL ~0), and
    recording the base's own eval in its manifest keeps the adapter loadable; bench --adapter: base and adapter
    interleaved on one session."""
    text = tmp_path / "text.txt"
    src = with_word_tokenizer(tiny_hf("llama"), tmp_path / "src", text, 80)
    pkg = _export(src, tmp_path / "pkg", targets="q,v")
    adapter = _convert(
        write_peft_adapter(src, tmp_path / "peft", ["q_proj", "v_proj"]), pkg, tmp_path / "a.onnx_adapter"
    )
    _ok(cli("eval", pkg, "--text", text, "--chunk", "32", "--json"))  # rewrites the manifest (its evaluation)
    with_adapter = json.loads(
        _ok(cli("eval", pkg, "--text", text, "--chunk", "32", "--json", "--adapter", adapter)).stdout
    )
    assert with_adapter["mean_kl"] < 1e-6 and with_adapter["top1_agreement"] == 1.0
    base = json.loads((pkg / "manifest.json").read_text())["evaluation"]
    assert abs(base["reference_perplexity"] - with_adapter["reference_perplexity"]) > 1e-3  # another model
    r = _ok(cli("bench", pkg, "--adapter", adapter, "--json", "--repeats", "2", "--prompt-len", "8", "--gen-len", "8"))
    result = json.loads(r.stdout)
    assert result["rank"] == 4 and len(result["base"]["samples"]["tg"]) == 2 and result["decode_ratio"] > 0
    assert_one_line_error(cli("eval", pkg, "--text", text, "--adapter", adapter, "--reference", "transformers"),
                          "--reference numpy")  # fmt: skip


def test_an_adapter_on_some_slots(tiny_hf, tmp_path):
    """An adapter on two of seven slot kinds: the slots it leaves alone get zeros of the slot rank (one `lora_rank`
    dimension is shared by every slot input; an empty one beside a full one made ONNX Runtime's buffer reuse fail
    with 'Shape mismatch attempting to re-use buffer'), and the package gives transformers + peft's logits."""
    src = tiny_hf("llama")
    pkg = _export(src, tmp_path / "pkg")
    peft = write_peft_adapter(src, tmp_path / "peft", ["o_proj", "down_proj"], r=4)
    runner = Package.open(pkg).runner(adapters=[_convert(peft, pkg, tmp_path / "a.onnx_adapter")])
    assert_tracks_reference(ReferenceRunner(src, adapters=[peft]), runner, PROMPT)


@pytest.mark.slow  # (the fast subset keeps under 3 minutes; CI runs it)
def test_tflite_adapters_refused_in_one_line(tiny_hf, tmp_path):
    """The LiteRT adapter file: made for this package or refused, not an adapter file, a tensor that is no slot's
    (each one line); two adapters on one loaded base switch, each giving its own tokens."""
    from mobilize.package.adapter import base_version
    from mobilize.targets.tflite.lora import read_adapter, write_adapter

    src = tiny_hf("llama")
    pkg = _export(src, tmp_path / "pkg", targets="q,v", fmt="tflite")
    other = _export(src, tmp_path / "other", targets="q,k,v", fmt="tflite")
    files = [_convert(write_peft_adapter(src, tmp_path / f"p{seed}", ["q_proj", "v_proj"], seed=seed), pkg,
                      tmp_path / f"a{seed}.lora.tflite") for seed in (1, 2)]  # fmt: skip
    base, tensors = read_adapter(files[0])
    assert base == base_version(Manifest.read(pkg)) and sorted(tensors)[0] == "lora_atten_q_a_prime_weight_0"
    wrong_base = _convert(write_peft_adapter(src, tmp_path / "p3", ["q_proj"]), other, tmp_path / "o.lora.tflite")
    assert_one_line_error(cli("run", pkg, "-p", "x", "--adapter", wrong_base), "made for another package")
    for name, data in (("junk", b"TFL3 but not a flatbuffer"), ("garbled", b"\x10\0\0\0TFL3" + bytes(range(200)))):
        junk = tmp_path / f"{name}.lora.tflite"  # (the second has the identifier where a flatbuffer has it)
        junk.write_bytes(data)
        assert_one_line_error(cli("run", pkg, "-p", "x", "--adapter", junk), "not a LiteRT LoRA adapter file")
    stray = tmp_path / "stray.lora.tflite"
    write_adapter(stray, {**tensors, "lora_atten_k_a_prime_weight_0": tensors["lora_atten_q_a_prime_weight_0"]},
                  base, 4)  # fmt: skip
    assert_one_line_error(cli("run", pkg, "-p", "x", "--adapter", stray), "'lora_atten_k_a_prime_weight_0' is no slot")
    partial, explicit = tmp_path / "a3.lora.tflite", tmp_path / "a4.lora.tflite"  # q only: v must be zeros, not
    write_adapter(partial, {k: v for k, v in tensors.items() if "_q_" in k}, base, 4)  # what a1 left in the inputs
    write_adapter(explicit, {k: v if "_q_" in k else np.zeros_like(v) for k, v in tensors.items()}, base, 4)
    runner = Package.open(pkg).runner(adapters=[*files, partial, explicit])
    outs, logits = {}, {}
    for name in ("a1", None, "a2", "a1", "a3", "a4"):
        runner.activate(name)
        out = [int(runner.prefill(PROMPT)[-1].argmax())]
        logits[name] = runner.decode(out[-1])
        while len(out) < 12:
            out.append(int(runner.decode(out[-1]).argmax()))
        assert outs.setdefault(name, out) == out
    assert len({tuple(outs[k]) for k in ("a1", None, "a2")}) == 3
    np.testing.assert_array_equal(logits["a3"], logits["a4"])


def test_litert_lm_ranks_and_the_old_layout_in_one_line(tiny_hf, tmp_path):
    """A LiteRT-LM bundle with slots of a rank its engine does not run is refused at export; a package with session
    14's separate `*_lora_r<R>` signatures is refused by the runner, saying to export it again."""
    from mobilize.targets.tflite.runner import LiteRtRunner

    src = tiny_hf("llama")
    r = cli("export", src, "-o", tmp_path / "pkg", "-t", "host", "-f", "tflite", "--lora-slots", "8",
            "--bundle", "litertlm")  # fmt: skip
    assert_one_line_error(r, "--lora-slots 8 with --bundle litertlm", "rank 16 or 32")
    assert not (tmp_path / "pkg").exists()
    r = cli("export", src, "-o", tmp_path / "slots", "-t", "host", "-f", "tflite", "-q", "fp32", "--max-seq-len", "64",
            "--prefill-len", "16", "--lora-slots", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    old = tmp_path / "old.tflite"  # a signature key of that layout's form (the same length: the flatbuffer holds)
    old.write_bytes((tmp_path / "slots" / "model.tflite").read_bytes().replace(b"prefill_16", b"p_lora_r16"))
    with pytest.raises(MobilizeError) as e:
        LiteRtRunner(str(old))
    assert "export it again" in str(e.value) and "\n" not in str(e.value)
