"""Calibration: how large each input channel of every linear layer runs on plain English text.

Re-rounding a weight to 4 bits trades error between its input channels; an error on a channel whose
activations are 40x the median costs 1600x as much at the output. `input_statistics` runs the model in
float32 numpy over a calibration text (quant/data/calibration.txt, written for this project and not
the text perplexity is measured on) and returns, per weight, the mean square of each input channel. The
quantizers weigh each block's rounding error by it (activation-aware rounding, quant/primitives).

The forward pass mirrors the lowering (targets/tflite/emitter.py) and goes a layer at a time: one layer's
weights in memory, all calibration sequences through it, so memory stays at one layer's weights plus the
activations whatever the model's size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mobilize.frontend.config import SLIDING, DecoderConfig, is_norm
from mobilize.frontend.loader import LoadedModel

TEXT = Path(__file__).parent / "data" / "calibration.txt"
F32 = np.float32
HEAD = "lm_head.weight"  # the head's input statistics, whether the head is tied to the embedding or not


def calibration_ids(tokenizer, max_tokens: int, bos: int | None, vocab_size: int) -> list[list[int]]:
    """The calibration text as token sequences of at most 512 tokens, each starting with `bos` (ids the
    model's embedding does not have are left out). `tokenizer`: a tokenizer.json path or a `tokenizers`
    Tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer
    ids = [i for i in tok.encode(TEXT.read_text(), add_special_tokens=False).ids if 0 <= i < vocab_size]
    ids = ids[:max_tokens]
    step = 511 if bos is not None else 512
    return [([bos] if bos is not None else []) + ids[i : i + step] for i in range(0, len(ids), step)]


def fewest_pieces_tokenizer(ckpt):
    """For a GGUF with a SentencePiece vocabulary (tokenizer model "llama", spaces written as U+2581): a
    tokenizer that splits text into the fewest pieces of that vocabulary. On the calibration text it gives
    99.8% the same tokens as the converted tokenizer (gemma3-270m: 1,324 tokens either way), in 0.7 s where
    the conversion takes ~2 s (it derives ~515k BPE merges), so calibration need not wait for it.
    None for other vocabularies (byte-level BPE: their conversion reads the merges and is quick)."""
    meta = ckpt.gguf_metadata
    if ckpt.format != "gguf" or not meta or meta.get("tokenizer.ggml.model") != "llama":
        return None
    from tokenizers import Tokenizer, models, normalizers

    tokens = meta.get("tokenizer.ggml.tokens")
    unknown = meta.get("tokenizer.ggml.unknown_token_id", 0)
    if not tokens or not isinstance(unknown, int) or not 0 <= unknown < len(tokens):
        return None
    try:
        tok = Tokenizer(models.Unigram([(t, -1.0) for t in tokens], unk_id=unknown, byte_fallback=True))
    except Exception:  # a vocabulary the model refuses (duplicates, ...): the caller converts instead
        return None
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    return tok


def input_statistics(model: LoadedModel, sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """{weight name: mean square of each input channel [in_features]} for every linear layer, and under
    "lm_head.weight" the head's (the final norm's output), over every position of `sequences`."""
    cfg, ckpt = model.config, model.weights
    sums: dict[str, np.ndarray] = {}
    count = sum(len(s) for s in sequences)

    loaded: dict[str, np.ndarray] = {}  # the current layer's weights, read once for all sequences

    def load(name: str) -> np.ndarray:
        if name not in loaded:
            w = np.asarray(ckpt[name].load(), F32)
            loaded[name] = w + F32(1.0) if cfg.norm_plus_one and is_norm(name) else w
        return loaded[name]

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        sums[name] = sums.get(name, 0.0) + np.einsum("sk,sk->k", x, x, dtype=np.float64)
        y = x @ load(name + ".weight").T
        if cfg.attention_bias and name.endswith(("q_proj", "k_proj", "v_proj")):
            y += load(name + ".bias")
        return y

    xs = [_embedding_rows(ckpt["model.embed_tokens.weight"], s) for s in sequences]
    if cfg.scale_embeddings:
        xs = [x * F32(np.sqrt(cfg.hidden_size)) for x in xs]
    for i, kind in enumerate(cfg.layer_types):
        xs = [_layer(cfg, i, kind, x, linear, load) for x in xs]
        loaded.clear()
    norm = load("model.norm.weight")
    for x in xs:
        h = _rms(x, norm, cfg.rms_norm_eps)
        sums[HEAD] = sums.get(HEAD, 0.0) + np.einsum("sk,sk->k", h, h, dtype=np.float64)
    return {(k if k == HEAD else k + ".weight"): (v / count).astype(F32) for k, v in sums.items()}


def statistics_for(statistics: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """A weight's statistics by its name: the head's for the head (lm_head, or the tied embedding: the
    embedding is only ever a linear layer's weight as the head); a packed weight's
    ("...q_proj+k_proj+v_proj.weight") those of its first part (the parts share one input)."""
    if name in (HEAD, "model.embed_tokens.weight"):
        return statistics.get(HEAD)
    return statistics.get(name.split("+")[0].removesuffix(".weight") + ".weight")


def _embedding_rows(ref, ids: list[int]) -> np.ndarray:
    """The embedding rows of `ids`; from a GGUF, only those rows' blocks are dequantized."""
    if ref.raw is not None:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = np.asarray(ref.raw()[np.asarray(ids)])
        return dequantize(rows, GGMLQuantizationType[ref.dtype]).reshape(len(ids), -1).astype(F32, copy=False)
    return np.asarray(ref.load(), F32)[np.asarray(ids)]


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps)) * w


def _rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _layer(cfg: DecoderConfig, i: int, kind: str, x: np.ndarray, linear, load) -> np.ndarray:
    p, eps = f"model.layers.{i}.", cfg.rms_norm_eps
    n, d, kvh = x.shape[0], cfg.head_dim, cfg.num_kv_heads
    h = _rms(x, load(p + "input_layernorm.weight"), eps)
    q = linear(h, p + "self_attn.q_proj").reshape(n, cfg.num_heads, d)
    k = linear(h, p + "self_attn.k_proj").reshape(n, kvh, d)
    v = linear(h, p + "self_attn.v_proj").reshape(n, kvh, d)
    if cfg.qk_norm:
        q = _rms(q, load(p + "self_attn.q_norm.weight"), eps)
        k = _rms(k, load(p + "self_attn.k_norm.weight"), eps)
    freqs = np.arange(n, dtype=F32)[:, None] * cfg.rope_inv_freq(kind).astype(F32)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    q, k = _rotary(q, np.cos(emb), np.sin(emb)), _rotary(k, np.cos(emb), np.sin(emb))
    groups = cfg.num_heads // kvh
    q = q.transpose(1, 0, 2).reshape(kvh, groups * n, d)  # grouped: [kv_heads, groups * n, d]
    scores = (q @ k.transpose(1, 2, 0)) * F32(cfg.attn_scale)
    if cfg.attn_logit_softcapping:
        scores = np.tanh(scores / F32(cfg.attn_logit_softcapping)) * F32(cfg.attn_logit_softcapping)
    pos = np.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    if kind == SLIDING:
        allowed &= pos[None, :] > pos[:, None] - cfg.sliding_window
    scores = np.where(np.tile(allowed, (groups, 1))[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = (probs @ v.transpose(1, 0, 2)).reshape(cfg.num_heads, n, d).transpose(1, 0, 2).reshape(n, -1)
    attn = linear(out, p + "self_attn.o_proj")
    if cfg.sandwich_norm:
        attn = _rms(attn, load(p + "post_attention_layernorm.weight"), eps)
    x = x + attn
    norm = "pre_feedforward_layernorm" if cfg.sandwich_norm else "post_attention_layernorm"
    h = _rms(x, load(p + norm + ".weight"), eps)
    gate = linear(h, p + "mlp.gate_proj")
    if cfg.hidden_act == "silu":
        act = gate / (F32(1.0) + np.exp(-gate))
    else:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g / (1 + exp(-2z)) (numpy's exp is vectorized)
        z = gate * gate
        z *= F32(0.044715)
        z += F32(1.0)
        z *= gate * F32(-2.0 * np.sqrt(2 / np.pi))
        with np.errstate(over="ignore"):
            act = gate / (F32(1.0) + np.exp(z))
    mlp = linear(act * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    if cfg.sandwich_norm:
        mlp = _rms(mlp, load(p + "post_feedforward_layernorm.weight"), eps)
    return x + mlp


FLOP_BUDGET = 1e12  # ~5 s of numpy on two cores: gemma3-270m sees the whole text (1,327 tokens), a 7B model 256
MIN_TOKENS = 256
# Enough to rank a head's input channels: on gemma3-270m the top 256 of 640 by 256 tokens and by the whole text
# (1,327 tokens) share 221, and the split head made from either gives the same perplexity (20.32 / 20.31).
RANKING_TOKENS = 256


def calibrate(model: LoadedModel, tokenizer, max_tokens: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The statistics for an export, and what the manifest says of them. `tokenizer`: the package's
    tokenizer.json, or `fewest_pieces_tokenizer`'s; `max_tokens` caps the text (a ranking of channels needs
    fewer tokens than a search of scales)."""
    from mobilize.frontend.tokenizer import special_token_ids

    bos = special_token_ids(model.ckpt).get("bos_token_id")
    vocab = model.config.vocab_size
    bos = bos if isinstance(bos, int) and 0 <= bos < vocab else None
    budget = max(MIN_TOKENS, int(FLOP_BUDGET / (2 * model.config.num_params)))
    budget = budget if max_tokens is None else min(budget, max_tokens)
    sequences = [s for s in calibration_ids(tokenizer, budget, bos, vocab) if s]
    info = {
        "used": True,
        "text": f"mobilize/quant/data/{TEXT.name}",
        "tokenized_by": "tokenizer.json" if isinstance(tokenizer, (str, Path)) else "fewest pieces of the vocabulary",
        "tokens": sum(len(s) for s in sequences),
        "sequences": len(sequences),
        "statistic": "mean square of each input channel of every linear layer and the head",
    }
    return input_statistics(model, sequences), info


class CalibrationInBackground:
    """`calibrate` in a child process, on the other core while the export writes the weights that do not
    need it (a thread would share the interpreter lock with the writer: measured slower than not overlapping
    at all). The child opens the source itself; a GGUF's text is split by `fewest_pieces_tokenizer`, or, for
    other vocabularies, by the tokenizer converted into the cache (converted there if need be)."""

    def __init__(self, spec: str, random_weights: bool, max_tokens: int | None) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: none of the parent's threads, locks
        self._receive, send = context.Pipe(duplex=False)
        self._child = context.Process(
            target=_calibrate_quietly, args=(spec, random_weights, max_tokens, send), daemon=True
        )
        with _single_threaded_blas():
            self._child.start()
        send.close()
        self._out: list = []

    def result(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """The statistics and their manifest entry; None if the child failed (the caller then converts the
        tokenizer and calibrates itself, and reports any error in one line)."""
        if not self._out:
            try:
                self._out.append(self._receive.recv() if self._receive.poll(600) else None)
            except (EOFError, OSError):  # the child exited without sending
                self._out.append(None)
            self.stop()
        return self._out[0]

    def stop(self) -> None:
        self._child.join(timeout=0 if not self._out else 10)
        if self._child.is_alive():
            self._child.kill()
            self._child.join()


@contextlib.contextmanager
def _single_threaded_blas():
    """Child processes started inside run numpy's BLAS on one thread: the export's own process has the other
    core. With the default two, OpenBLAS's idle worker spins between the forward pass's small matrix products
    (measured ~1.5 s of a core on gemma3-270m, taken from the export)."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _calibrate_quietly(spec: str, random_weights: bool, max_tokens: int | None, send) -> None:
    from mobilize.frontend.tokenizer import as_export_child, ensure_tokenizer_json

    as_export_child()
    try:
        from mobilize.frontend.loader import load_model, open_checkpoint

        ckpt = open_checkpoint(spec, random_weights)
        model = load_model(ckpt)
        send.send(calibrate(model, fewest_pieces_tokenizer(ckpt) or ensure_tokenizer_json(ckpt), max_tokens))
    except BaseException:
        os._exit(1)  # the parent calibrates again and reports the error itself
