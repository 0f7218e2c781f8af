"""Tokenizer files for the package: copied from a Hugging Face directory, or built from a GGUF's
embedded vocabulary into `tokenizer.json` (SentencePiece vocabularies by `_sentencepiece_backend`, the others
with transformers' GGUF tokenizer builders; no torch needed)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mobilize import cache_root
from mobilize.errors import CheckpointError, MobilizeError
from mobilize.frontend.families.registry import FAMILIES
from mobilize.frontend.gguf_pretokenizers import known_names, pre_tokenizer
from mobilize.frontend.sources.base import Checkpoint
from mobilize.partials import remove_dead
from mobilize.safe_io import MAX_JSON_BYTES as MAX_SMALL_JSON_BYTES
from mobilize.safe_io import MAX_TOKENIZER_JSON_BYTES, read_bytes, read_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


def special_token_ids(ckpt: Checkpoint) -> dict[str, int | list[int] | None]:
    """bos/eos/pad ids as the source states them (GGUF metadata, or config.json and generation_config.json)."""
    if ckpt.gguf_metadata is not None:
        m = ckpt.gguf_metadata
        return {
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": m.get("tokenizer.ggml.padding_token_id"),
        }
    ids = {k: (ckpt.hf_config or {}).get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ckpt.format == "hf":
        gen = Path(ckpt.files[0]).parent / "generation_config.json"
        if os.path.lexists(gen):
            extra = read_json(gen, root=gen.parent)
            ids |= {k: extra[k] for k in ids if extra.get(k) is not None}
    return ids


def check_special_ids(tokens: dict, vocab_size: int) -> None:
    """Special token ids are integers (not booleans, not strings) inside the vocabulary: a runtime would index
    past the logits with any other."""
    for key, value in tokens.items():
        for v in value if isinstance(value, list) else [value]:
            if v is None and not isinstance(value, list):
                continue
            if type(v) is not int or not 0 <= v < vocab_size:
                raise CheckpointError(
                    f"the source's {key} is {repr(value)[:60]}, not a token id of its {vocab_size}-token vocabulary"
                )


def check_tokenizer(ckpt: Checkpoint, vocab_size: int, package: Path) -> None:
    """What the package's tokenizer hands a runtime fits the model: special ids and every token id inside the
    embedding, and a vocabulary not a fraction of it (a tokenizer of another model)."""
    check_special_ids(special_token_ids(ckpt), vocab_size)
    if (package / "tokenizer_config.json").is_file():
        config = read_json(package / "tokenizer_config.json")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = config.get(key)
            if not (v is None or isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str)):
                raise CheckpointError(f"tokenizer_config.json: {key} is {repr(v)[:60]}, not a token's text")
    file = package / "tokenizer.json"
    if not file.is_file():
        return
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    if size > vocab_size or size * 2 < vocab_size:
        raise CheckpointError(
            f"the tokenizer has {size} tokens for an embedding of {vocab_size} rows: "
            + ("its ids would index past the table" if size > vocab_size else "it is not this model's tokenizer")
        )


def write_tokenizer(ckpt: Checkpoint, out: Path) -> list[str]:
    """Write the tokenizer next to the model; return the file names (empty when the source has none)."""
    if ckpt.format == "hf":
        src = Path(ckpt.files[0]).parent
        written = []
        for name in TOKENIZER_FILES:
            if os.path.lexists(src / name):  # read once, checked, and those bytes written (not the path copied)
                json_file = name.endswith(".json")
                data = _check_json(src / name) if json_file else read_bytes(src / name, MAX_JSON_BYTES, src)
                (out / name).write_bytes(data)
                written.append(name)
        _template_into_config(out)
        return written
    if ckpt.format == "gguf" and ckpt.gguf_metadata and "tokenizer.ggml.tokens" in ckpt.gguf_metadata:
        return _cached_from_gguf(Path(ckpt.files[0]).name, ckpt.gguf_metadata, out)
    return []


def _template_into_config(out: Path) -> None:
    """transformers saves a chat template as chat_template.jinja; ONNX Runtime GenAI and our runner read
    tokenizer_config.json's chat_template: put it there too (the .jinja file stays, as the source had it)."""
    jinja, config_file = out / "chat_template.jinja", out / "tokenizer_config.json"
    if not jinja.is_file():
        return
    try:
        template = jinja.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("chat_template.jinja is not UTF-8") from None
    config = read_json(config_file) if config_file.is_file() else {}
    if not config.get("chat_template"):
        config["chat_template"] = template
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def has_tokenizer_json(ckpt: Checkpoint) -> bool:
    """Whether `write_tokenizer` will give a tokenizer.json (copied from the source, or converted)."""
    if ckpt.format == "hf":
        return (Path(ckpt.files[0]).parent / "tokenizer.json").is_file()
    return ckpt.format == "gguf" and bool(ckpt.gguf_metadata) and "tokenizer.ggml.tokens" in ckpt.gguf_metadata


def ensure_tokenizer_json(ckpt: Checkpoint) -> Path:
    """The source's tokenizer.json (checked), or a GGUF's converted one in the cache (converted now if it is
    not there yet), for a source that has one (`has_tokenizer_json`)."""
    if ckpt.format == "hf":
        path = Path(ckpt.files[0]).parent / "tokenizer.json"
        _check_json(path)
        return path
    return _ensure_cached(Path(ckpt.files[0]).name, ckpt.gguf_metadata) / "tokenizer.json"


MAX_JSON_BYTES = MAX_TOKENIZER_JSON_BYTES


def _check_json(path: Path) -> bytes:
    """A source's JSON file is a bounded JSON object (a regular file, a symlink only within its directory), and
    tokenizer.json one the tokenizers library loads, before it goes into a package that apps will parse. Returns
    the bytes that were checked."""
    limit = MAX_TOKENIZER_JSON_BYTES if path.name == "tokenizer.json" else MAX_SMALL_JSON_BYTES
    text = read_bytes(path, limit, path.parent)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path.name} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    if path.name == "tokenizer.json":
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(text.decode())
        except Exception as e:  # the Rust parser's errors: say which file, keep one line
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise CheckpointError(
                f"tokenizer.json is not a tokenizer the tokenizers library can load: {reason}"
            ) from None
    return text


_CONVERTER = "mobilize tokenizer converter 7"  # in the cache key: a conversion that changes is not reused


def _cached_dir(meta: dict) -> Path:
    """Where a GGUF's converted tokenizer is cached: keyed by the hash of every tokenizer.* key."""
    digest = hashlib.sha256(_CONVERTER.encode())
    for key in sorted(k for k in meta if k.startswith("tokenizer.") or k == "general.architecture"):
        digest.update(key.encode())
        digest.update(json.dumps(meta[key], default=repr).encode())
    return cache_root() / "tokenizers" / digest.hexdigest()[:32]


_CACHED_NAMES = ("tokenizer.json", "tokenizer_config.json")


_DIGESTS = "sha256.json"  # written with a cache entry: an entry whose files no longer match is converted again


def _digests(d: Path) -> dict[str, str]:
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in _CACHED_NAMES}


def _complete(cached: Path) -> bool:
    return all((cached / n).is_file() for n in (*_CACHED_NAMES, _DIGESTS))


def _ensure_cached(file_name: str, meta: dict) -> Path:
    cached = _cached_dir(meta)
    if _complete(cached):
        try:
            intact = json.loads((cached / _DIGESTS).read_text()) == _digests(cached)
        except (OSError, ValueError):
            intact = False
        if not intact:
            shutil.rmtree(cached, ignore_errors=True)
    if not _complete(cached):
        remove_dead(_mkdir(cached.parent), "tokenizer-*", "tokenizer-")  # conversions killed midway
        tmp = Path(tempfile.mkdtemp(prefix=f"tokenizer-{os.getpid()}-", dir=cached.parent))
        try:
            _from_gguf(file_name, meta, tmp)
            (tmp / _DIGESTS).write_text(json.dumps(_digests(tmp)))
            if cached.exists():  # another export converted it meanwhile
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, cached)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return cached


def _cached_from_gguf(file_name: str, meta: dict, out: Path) -> list[str]:
    """The conversion takes seconds for a 262k-token vocabulary: do it once per distinct tokenizer and copy
    the result afterwards."""
    cached = _ensure_cached(file_name, meta)
    for n in _CACHED_NAMES:
        shutil.copyfile(cached / n, out / n)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["source"] = f"converted from the GGUF metadata of {file_name}"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return list(_CACHED_NAMES)


def convert_in_background(ckpt: Checkpoint) -> Callable[[], None]:
    """Start converting a GGUF's tokenizer into the cache in a child process, so the conversion (~2 s for
    Gemma's 262k vocabulary, more through transformers) runs on another core while the export quantizes.
    Returns the function that waits for it; `write_tokenizer` then copies the cached files, or converts in
    this process (and reports any error in one line) if the child did not finish."""
    meta = ckpt.gguf_metadata
    if ckpt.format != "gguf" or not meta or "tokenizer.ggml.tokens" not in meta:
        return lambda: None
    if meta.get("tokenizer.ggml.model") == "gpt2":  # a pre-tokenizer it cannot split as llama.cpp: before any work
        _known_split(Path(ckpt.files[0]).name, meta.get("tokenizer.ggml.pre"))
    if _complete(_cached_dir(meta)):
        return lambda: None
    keys = {k: v for k, v in meta.items() if k.startswith("tokenizer.") or k == "general.architecture"}
    # spawn, not fork: a clean interpreter, none of the parent's threads or locks
    child = multiprocessing.get_context("spawn").Process(
        target=_convert_quietly, args=(Path(ckpt.files[0]).name, keys), daemon=True
    )
    child.start()

    def wait() -> None:
        child.join(timeout=300)
        if child.is_alive():
            child.kill()
            child.join()

    return wait


def as_export_child() -> None:
    """In a child process of an export: the parent's Ctrl-C is the parent's to handle; when it exits it
    terminates the child (SIGTERM), which leaves through its cleanups then (a conversion's temporary
    directory), not past them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def _convert_quietly(file_name: str, meta: dict) -> None:
    as_export_child()
    try:
        _ensure_cached(file_name, meta)
    except BaseException:
        os._exit(1)  # the parent converts again and reports the error itself


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _transformers_gguf_builders():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no advisory chatter about a missing torch
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping
    except ImportError as e:
        raise MobilizeError(f"converting a GGUF tokenizer needs transformers >= 5 ({e})") from None
    return gguf_tokenizer_mapping


def _from_gguf(file_name: str, meta: dict, out: Path) -> list[str]:
    """Build tokenizer.json from llama.cpp's tokenizer keys, then add the BOS/EOS template the file's flags
    ask for. SentencePiece vocabularies (Gemma, Llama 2, Mistral) are built here (`_sentencepiece_backend`), the
    others with transformers' GGUF tokenizer builders (which need no torch)."""
    from tokenizers import processors

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise MobilizeError(f"{file_name}: its tokenizer could not be converted (no tokenizer.ggml.tokens list)")
    specials = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):  # fmt: skip
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            specials[name] = (tokens[token_id], token_id)
    try:
        if _is_sentencepiece(meta):
            named = [specials[k][1] for k in ("unk_token", "bos_token", "eos_token", "pad_token") if k in specials]
            # llama.cpp prefixes a space (SentencePiece's add_dummy_prefix) unless the file says not to; Gemma's
            # vocabularies never do
            gemma = meta["general.architecture"] in _GEMMA_ARCHITECTURES
            prefix = meta.get("tokenizer.ggml.add_space_prefix", not gemma)
            # llama.cpp (as SentencePiece) merges the pair whose piece scores highest; Gemma's scores do not follow
            # its merge order, its file order does
            scores = None if gemma else meta.get("tokenizer.ggml.scores")
            types = meta.get("tokenizer.ggml.token_type") or ()
            backend = _sentencepiece_backend(tokens, types, named, prefix, scores)
        else:
            gguf_tok = _transformers_gguf_builders()
            tok_dict = {
                name: meta[f"tokenizer.{key}"]
                for key, name in gguf_tok.GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                if f"tokenizer.{key}" in meta
            }
            backend, _ = gguf_tok.convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
            if meta.get("tokenizer.ggml.model") == "gpt2":
                _split_as_llama_cpp(file_name, meta.get("tokenizer.ggml.pre"), backend)
            backend = _file_tokens_only(backend, len(tokens))
    except MobilizeError:
        raise
    except Exception as e:  # the builders' errors are many and unrelated; name the file and the cause
        raise MobilizeError(f"{file_name}: its tokenizer could not be converted ({type(e).__name__}: {e})") from None
    pre = pre_tokenizer(meta.get("tokenizer.ggml.pre")) if meta.get("tokenizer.ggml.model") == "gpt2" else None
    default_bos = meta.get("tokenizer.ggml.model") == "llama" or (pre is not None and pre.add_bos)  # llama.cpp's
    add_bos = meta.get("tokenizer.ggml.add_bos_token", default_bos)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    template, used = "$A", []
    if add_bos and "bos_token" in specials:
        template = f"{specials['bos_token'][0]} {template}"
        used.append(specials["bos_token"])
    if add_eos and "eos_token" in specials:
        template = f"{template} {specials['eos_token'][0]}"
        used.append(specials["eos_token"])
    if used:
        backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    backend.save(str(out / "tokenizer.json"))
    config = {name: tok for name, (tok, _) in specials.items()} | {
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(add_eos),
        "source": f"converted from the GGUF metadata of {file_name}",
    }
    if isinstance(meta.get("tokenizer.chat_template"), str):  # where GenAI and `mobilize run --chat` look for it
        config["chat_template"] = meta["tokenizer.chat_template"]
    family = next((f for f in FAMILIES.values() if f.gguf_arch == meta["general.architecture"]), None)
    if family is not None:  # ONNX Runtime GenAI picks its tokenizer by this
        config["tokenizer_class"] = family.tokenizer_class
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def _known_split(file_name: str, name: str | None):
    pre = pre_tokenizer(name)
    if pre is None:
        raise MobilizeError(
            f"{file_name}: its tokenizer's pre-tokenizer {name!r} (tokenizer.ggml.pre) is not one mobilize splits "
            f"text as llama.cpp does; known: {', '.join(known_names())}"
        )
    return pre


def _split_as_llama_cpp(file_name: str, name: str | None, backend) -> None:
    """A byte-level BPE's pre-tokenizer and `ignore_merges`, as llama.cpp reads the file's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    pre = _known_split(file_name, name)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    backend.model.ignore_merges = pre.ignore_merges


def _file_tokens_only(backend, count: int):
    """Without the tokens the builder adds beyond the file's (GPT-2's `<|endoftext|>` as the unknown token, for a
    vocabulary such as Llama 3's that has none): their ids would index past the model's embedding."""
    from tokenizers import Tokenizer

    if backend.get_vocab_size(with_added_tokens=True) <= count:
        return backend
    spec = json.loads(backend.to_str())
    kept = [t for t in spec["added_tokens"] if t["id"] < count]
    dropped = {t["content"] for t in spec["added_tokens"]} - {t["content"] for t in kept}
    spec["added_tokens"] = kept
    if spec["model"].get("unk_token") in dropped:
        spec["model"]["unk_token"] = None
    return Tokenizer.from_str(json.dumps(spec))


def _is_sentencepiece(meta: dict) -> bool:
    """A SentencePiece BPE vocabulary (llama.cpp's "llama" model, no merges listed): Llama 1/2, Mistral, Gemma."""
    return meta.get("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in meta


def _sentencepiece_backend(
    file_tokens: list[str], token_types, special_ids: list[int], prefix: bool = False, scores: list | None = None
):
    """A GGUF's SentencePiece vocabulary as a `tokenizers` BPE: for Gemma the same tokenizer.json transformers'
    GGUF builder gives (tested byte for byte on gemma3-270m), in ~2 s instead of ~5 s (its import, and its
    merge search, which sorts every candidate pair). The file lists no merges: every split of a token into
    two tokens is one, ranked by the merged token's position in the file, longer left parts first (Gemma's
    scores do not follow its merge order), or, given `scores` (one per token, as long as the file's list), by the
    merged token's score, best first, then its position: SentencePiece's and llama.cpp's order (Llama 2's runs of
    spaces score -1e9, so " Hello" is "▁" "▁Hello", not "▁▁" "Hello"). Tokens of two or more spaces are stored as
    spaces but looked up as U+2581 runs. Control tokens (type 3) become special added tokens, user-defined ones
    (type 4) plain added tokens, kept whole in the text as llama.cpp does; so do the tokens the file names as
    unknown, BOS, EOS and padding, and `<mask>`, whatever their type (as transformers' Gemma tokenizer adds them).

    `prefix` is SentencePiece's dummy prefix (Llama 2, Mistral): one U+2581 before the text, always, also when
    the text starts with a space (" Hi" is "▁▁Hi", as SentencePiece and llama.cpp encode it; transformers' GGUF
    builder's Metaspace gives "▁Hi"), and one space fewer when decoding."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in file_tokens]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last position
    merges = []
    order = range(len(tokens))
    if scores is not None and len(scores) == len(tokens):
        order = sorted(order, key=lambda i: (-scores[i], i))
    for i in order:
        t = tokens[i]
        if vocab[t] != i:
            continue
        for cut in range(len(t) - 1, 0, -1):
            left = t[:cut]
            if left in vocab and (right := t[cut:]) in vocab:
                merges.append((left, right))
    unknown = next((t for t, kind in zip(file_tokens, token_types, strict=False) if kind == 2), "<unk>")  # type 2
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unknown, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    # No spaces are left once normalized: the split on " " does nothing here, as in Gemma's own tokenizer.json. With
    # a dummy prefix there is none, as in Llama 2's: onnxruntime-extensions (GenAI's tokenizer) reads a Split on a
    # string as "no dummy prefix" and would leave it out (the export's parity check found it).
    if not prefix:
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    kinds = list(zip(file_tokens, token_types, strict=False))  # a file may list no types
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in kinds if kind == 3])
    named = [file_tokens[i] for i in special_ids] + (["<mask>"] if "<mask>" in vocab else [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in kinds if kind == 4 and t in vocab])
    return tok
