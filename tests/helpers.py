"""Tiny real checkpoints on disk: Hugging Face directories written by transformers, GGUF files
written by the `gguf` package the way llama.cpp's converter lays them out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mobilize.frontend.config import DecoderConfig, is_norm
from mobilize.frontend.families.common import permute_rotary
from mobilize.frontend.families.registry import FAMILIES


def write_tiny_hf(cfg: DecoderConfig, out: Path, seed: int = 0) -> Path:
    """Random weights (norms included, so (1 + w) conventions are exercised) saved by transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = FAMILIES[cfg.family].to_hf(cfg)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if cfg.norm_plus_one else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_GEMMA = _LAYER | {
    "pre_feedforward_layernorm": "ffn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def write_tiny_gguf(
    cfg: DecoderConfig, hf_dir: Path, out: Path, quant: dict[str, str] | None = None, vocab: dict | None = None
) -> Path:
    """Convert a tiny HF checkpoint to GGUF as llama.cpp does (q/k row order for llama, +1 on Gemma norms).
    `quant` maps a GGUF tensor-name suffix to a ggml type name (e.g. {"ffn_up.weight": "Q8_0"}); `vocab` holds
    `tokenizer.*` keys to write as they are (another GGUF's, as `read_gguf` reads them)."""
    import gguf
    from safetensors.numpy import load_file

    arch = cfg.family if cfg.family != "mistral" else "llama"
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    for key, value in (vocab or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    table = _LAYER_GEMMA if cfg.family == "gemma3" else _LAYER
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if name in _GGUF_NAMES:
            gname = _GGUF_NAMES[name]
        else:
            _, _, i, rest = name.split(".", 3)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{table[stem]}.{kind}"
        if cfg.family in ("llama", "mistral") and gname.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_rotary(t, cfg.num_heads if "attn_q" in gname else cfg.num_kv_heads)
        if cfg.norm_plus_one and is_norm(name):
            t = t + 1.0
        qtype = next((q for suffix, q in (quant or {}).items() if gname.endswith(suffix)), None)
        if qtype:
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def genai_greedy(package: Path, prompt: list[int], n_new: int) -> list[int]:
    """Greedy tokens from ONNX Runtime GenAI running a package directory as it is."""
    import onnxruntime_genai as og

    model = og.Model(str(package))
    params = og.GeneratorParams(model)
    # The package's own max_length: a static cache is that long (GenAI sizes window buffers from it too).
    max_length = json.loads((Path(package) / "genai_config.json").read_text())["search"]["max_length"]
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done() and len(out) < n_new:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def assert_tracks_reference(ref, ours, prompt: list[int], steps: int = 8, atol: float = 1e-4) -> None:
    """`ours` gives the reference's logits for the prompt (every position, or the last one where its
    prefill returns only that) and for `steps` greedy decode steps after it."""
    expected, got = ref.prefill(prompt), ours.prefill(prompt)
    expected = expected[-len(got) :]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0)
    token = int(expected[-1].argmax())
    for _ in range(steps):
        expected, got = ref.decode(token), ours.decode(token)
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0)
        token = int(expected.argmax())


def write_peft_adapter(
    hf_dir: Path, out: Path, targets, r: int = 4, alpha: float = 8, seed: int = 1, randomize: bool = True, **config
) -> Path:
    """A LoRA adapter written by peft itself on the checkpoint in `hf_dir`, both halves random (peft starts B at
    zero, which would make any mistake invisible; `randomize=False` keeps peft's own start)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and randomize:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(str(out))
    return out


def peft_targets(family: str, targets) -> list[str]:
    """The module names peft sees: a family's fused projection (phi3's qkv_proj) for the weights it holds."""
    fused = FAMILIES[family].fused
    out = [t for t in targets if not any(t in (p.rsplit(".", 1)[1] for p in ps) for ps in fused.values())]
    return out + [f.rsplit(".", 1)[1] for f, ps in fused.items() if any(p.rsplit(".", 1)[1] in targets for p in ps)]


BPE_VOCAB = 320  # the 256 bytes of a byte-level BPE, its specials, some merges


def write_tiny_bpe(family: str, dst: Path) -> Path:
    """A tiny checkpoint of `family` with a byte-level BPE tokenizer trained on the calibration text (as GPT-2's,
    Llama 3's and Qwen's are, and as ONNX Runtime GenAI and LiteRT-LM read them), turn markers among its specials,
    <s> its BOS (not added by the tokenizer) and </s> its EOS."""
    import dataclasses

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    write_tiny_hf(dataclasses.replace(FAMILIES[family].tiny(), vocab_size=BPE_VOCAB), dst)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = Path(__file__).parents[1] / "src" / "mobilize" / "quant" / "data" / "calibration.txt"
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train([str(text)], trainer)
    tok.save(str(dst / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}  # fmt: skip
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = json.loads((dst / "config.json").read_text()) | {"bos_token_id": 1, "eos_token_id": 2}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "generation_config.json").unlink(missing_ok=True)
    return dst


def with_word_tokenizer(hf_dir: Path, out: Path, text: Path, n_words: int, seed: int = 0) -> Path:
    """A copy of a tiny checkpoint with a word-level tokenizer (w0..w127 are ids 0..127), and a text of `n_words`
    random such words written to `text`: what `mobilize eval` needs of a tiny model."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(hf_dir, out)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(seed).integers(0, 128, n_words)))
    return out


def cli(*args, timeout: int = 300):
    """`mobilize ARGS...` in a child process (every argument as a string)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mobilize.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 1 and one line on stderr, `mobilize: error: ...`, holding every needle."""
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mobilize: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
