"""Calibration: how large each input channel of every linear layer runs on plain English text.

Re-rounding a weight to 4 bits trades error between its input channels; an error on a channel whose
activations are 40x the median costs 1600x as much at the output. `input_statistics` runs the model in
float32 numpy over a calibration text (quant/data/calibration.txt, written for this project and not
the text perplexity is measured on) and returns, per weight, the mean square of each input channel. The
quantizers weigh each block's rounding error by it (activation-aware rounding, quant/primitives).

The forward pass is the one decoder (model/decoder.py) on the numpy emitter, a layer at a time: one layer's
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

from mobilize.frontend.loader import LoadedModel
from mobilize.model.decoder import decode
from mobilize.model.numpy_emitter import HEAD, NumpyEmitter

TEXT = Path(__file__).parent / "data" / "calibration.txt"
F32 = np.float32


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
    "lm_head.weight" the head's (the final norm's output), over every position of `sequences`: the decoder
    (model/decoder.py) run by the numpy emitter, a layer at a time over all sequences."""
    sums: dict[str, np.ndarray] = {}
    decode(model.config, NumpyEmitter(model.config, model.weights, sequences, statistics=sums, logits=False))
    count = sum(len(s) for s in sequences)
    return {(k if k == HEAD else k + ".weight"): (v / count).astype(F32) for k, v in sums.items()}


def statistics_for(statistics: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """A weight's statistics by its name: the head's for the head (lm_head, or the tied embedding: the
    embedding is only ever a linear layer's weight as the head); a packed weight's
    ("...q_proj+k_proj+v_proj.weight") those of its first part (the parts share one input)."""
    if name in (HEAD, "model.embed_tokens.weight"):
        return statistics.get(HEAD)
    return statistics.get(name.split("+")[0].removesuffix(".weight") + ".weight")


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
    other vocabularies, by the tokenizer converted into the cache (converted there if need be). The statistics are
    the source's own, without adapters: a package with a LoRA merged is planned as its base is (driver.py)."""

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
        tokenizer = fewest_pieces_tokenizer(ckpt) or ensure_tokenizer_json(ckpt)
        send.send(calibrate(load_model(ckpt), tokenizer, max_tokens))
    except BaseException:
        os._exit(1)  # the parent calibrates again and reports the error itself
