"""`mobilize eval`: how far a package's predictions are from the reference model's (fp32, on the package's own
source checkpoint), on a text and on greedy continuations of a few prompts. The reference is the one decoder in
numpy (no torch needed), or transformers when asked (`--reference transformers`, an independent implementation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.harness.accuracy import log_softmax
from mobilize.harness.runner import greedy, score
from mobilize.manifest import MANIFEST, FileEntry, Manifest
from mobilize.safe_io import quoted, sha256_file

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "bench" / "data" / "river.txt"
PROMPTS = ("The capital of France is", "Water boils at a temperature of", "Once upon a time, there was a")


def reference_source(manifest: Manifest) -> Path:
    """The checkpoint the package was exported from, as a path transformers can load."""
    from mobilize.frontend.loader import open_checkpoint

    if manifest.source.format == "random":
        raise MobilizeError("the package was exported with --random-weights: there is no reference model to compare")
    ckpt = open_checkpoint(manifest.source.id)
    first = Path(ckpt.files[0])
    return first if ckpt.format == "gguf" else first.parent


REFERENCES = ("numpy", "transformers")


def reference_runner(manifest: Manifest, reference: str, adapter: dict | None = None):
    """The reference runner for a package's source: numpy (mobilize's decoder, torch-free) or transformers.
    `adapter`: an adapter file's updates by weight name (package/adapter.py's merged_reference_deltas), merged into
    the numpy reference's weights."""
    if reference not in REFERENCES:
        raise MobilizeError(f"unknown --reference {reference!r} (known: {', '.join(REFERENCES)})")
    source = reference_source(manifest)
    if adapter is not None:
        if reference != "numpy":
            raise MobilizeError(
                "--adapter: the reference is mobilize's decoder with the adapter merged (--reference numpy); for "
                "transformers + peft, export with --lora and evaluate that package"
            )
        from mobilize.frontend.loader import load_model, open_checkpoint
        from mobilize.frontend.lora import merge_deltas
        from mobilize.model.numpy_runner import NumpyRunner
        model = load_model(open_checkpoint(str(source)))
        merged = list(manifest.source.adapters)  # merged at export: in the reference too
        if merged:
            from mobilize.frontend.lora import apply_adapters

            model = apply_adapters(model, [a["path"] for a in merged], merged)[0]
        return NumpyRunner(merge_deltas(model, [(n, lambda d=d: d) for n, d in adapter.items()]))
    adapters = list(manifest.source.adapters)  # merged into the package: the reference applies them too
    if reference == "numpy":
        from mobilize.model.numpy_runner import NumpyRunner

        return NumpyRunner.for_source(str(source), adapters)
    gguf = [a["path"] for a in adapters if a.get("format") == "gguf"]
    if gguf:
        raise MobilizeError(f"--reference transformers: the adapter {quoted(gguf[0])} is a llama.cpp GGUF LoRA, which "
                            "peft cannot read; the numpy reference applies it")  # fmt: skip
    try:
        from mobilize.harness.reference import ReferenceRunner

        if adapters:
            _check_adapters(manifest, adapters)
        return ReferenceRunner.for_path(source, [a["path"] for a in adapters])
    except ModuleNotFoundError as e:
        raise MobilizeError(
            f"--reference transformers needs {e.name} (pip install 'mobilize[reference]'); "
            "the default numpy reference needs nothing more"
        ) from None


def _check_adapters(manifest: Manifest, adapters: list[dict]) -> None:
    """The adapter files are the ones merged at export (read and checked by mobilize's loader first)."""
    from mobilize.frontend.loader import load_model, open_checkpoint
    from mobilize.frontend.lora import apply_adapters

    apply_adapters(load_model(open_checkpoint(manifest.source.id)), [a["path"] for a in adapters], adapters)


def runners(package, reference: str, threads: int, adapter: Path | None = None):
    """(the reference, the package's runner); `adapter`: a LoRA adapter file for the package's slots, active in
    the package and merged into the reference."""
    checked, deltas = {}, None
    if adapter is not None:  # read and checked once, for both
        from mobilize.package.adapter import merged_reference_deltas

        checked = package.adapter_files([adapter])
        deltas = merged_reference_deltas(next(iter(checked.values())), package.path, package.manifest)
    ref = reference_runner(package.manifest, reference, deltas)  # first: a package without a source says so
    return ref, package.runner(threads, checked=checked)


def evaluate(
    package, text: str, chunk: int = 256, new_tokens: int = 16, threads: int = 0, reference: str = "numpy",
    adapter: Path | None = None,
) -> dict[str, Any]:
    ref, ours = runners(package, reference, threads, adapter)  # first: a package without a source says so
    tok = package.tokenizer()
    ids = tok.encode(text).ids
    if len(ids) < 2:
        raise MobilizeError("the evaluation text is shorter than two tokens")
    sums = _score_text(ours, ref, tok, ids, chunk)
    matches = []
    for prompt in PROMPTS:
        p = tok.encode(prompt).ids
        a, b = greedy(ours, p, new_tokens), greedy(ref, p, new_tokens)
        matches.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
    return {
        "reference": reference,
        "chunk": chunk,
        **_figures(sums),
        "greedy_match": {"prompts": list(PROMPTS), "new_tokens": new_tokens, "matched": matches},
    }


def evaluate_set(
    package, texts, max_tokens: int = 1024, chunk: int = 256, threads: int = 0, reference: str = "numpy",
    adapter: Path | None = None,
) -> dict[str, Any]:
    """The figures of each text (its first `max_tokens` tokens), of each split and of all of them."""
    from mobilize.harness.texts import sha256_text

    ref, ours = runners(package, reference, threads, adapter)
    tok = package.tokenizer()
    per_text, by_split = {}, {}
    for t in texts:
        body = t.read()
        ids = tok.encode(body).ids[:max_tokens]
        if len(ids) < 2:
            raise MobilizeError(f"evaluation text {t.name} is shorter than two tokens")
        sums = _score_text(ours, ref, tok, ids, chunk)
        per_text[t.name] = {"kind": t.kind, "split": t.split, "origin": t.origin, "sha256": sha256_text(body),
                            **_figures(sums)}  # fmt: skip
        for key in (t.split, "all"):
            acc = by_split.setdefault(key, dict.fromkeys(sums, 0.0))
            for k, v in sums.items():
                acc[k] += v
    return {
        "reference": reference,
        "chunk": chunk,
        "max_tokens_per_text": max_tokens,
        **_figures(by_split["all"]),
        "splits": {k: _figures(v) for k, v in by_split.items() if k != "all"},
        "texts": per_text,
    }


def _chunks(tok, ids: list[int], chunk: int):
    """(the BOS prefix's length, the ids) of each chunk the text is scored in, from an empty cache.

    Every chunk starts as the text does: with the BOS token where the tokenizer adds one (a model like Gemma is
    far from itself mid-text without it, and so is any int8-activation kernel: differences between kernels there
    are not the package's error). The BOS row itself is not scored."""
    bos = tok.encode("").ids[:1]  # (an empty text may also get an EOS)
    for start in range(0, len(ids) - 1, chunk):
        prefix = bos if start and bos and ids[0] == bos[0] else []
        piece = prefix + ids[start : start + chunk + 1]
        if len(piece) - len(prefix) < 2:
            break
        yield len(prefix), piece


def _score_text(ours, ref, tok, ids: list[int], chunk: int) -> dict[str, float]:
    """Sums over the text's positions: negative log-likelihoods, top-1 agreements, KL, count."""
    out = {"nll_package": 0.0, "nll_reference": 0.0, "agree": 0.0, "kl": 0.0, "count": 0.0}
    for skip, piece in _chunks(tok, ids, chunk):
        lp_ours = log_softmax(score(ours, piece[:-1]))[skip:]
        lp_ref = log_softmax(score(ref, piece[:-1]))[skip:]
        target = np.asarray(piece[skip + 1 :])
        rows = np.arange(len(target))
        out["nll_package"] -= float(lp_ours[rows, target].sum())
        out["nll_reference"] -= float(lp_ref[rows, target].sum())
        out["agree"] += int((lp_ours.argmax(-1) == lp_ref.argmax(-1)).sum())
        out["kl"] += float((np.exp(lp_ref) * (lp_ref - lp_ours)).sum())
        out["count"] += len(target)
    return out


KL_TOP = 1024  # eval --device: the KL over the reference's most likely tokens, the rest as one (~98% of the full KL)


def evaluate_on_device(
    package, text: str, spec: str, python: str = "python3", workdir: str | None = None, chunk: int = 256,
    new_tokens: int = 16, threads: int = 0, reference: str = "numpy",
) -> dict[str, Any]:
    """`evaluate`, with the package run on a device (harness/device.py): the device scores the text's chunks and
    continues the prompts greedily; here the reference does the same and the figures are computed. The device
    returns, per position, its logits at the reference's top KL_TOP tokens and the next token, their log-sum-exp
    and its argmax: perplexity and top-1 agreement are exact; the KL is the one between the two distributions
    over those tokens with the rest as one outcome (a lower bound of the full KL, which it nears when the
    reference's top tokens hold most of its mass)."""
    from mobilize.harness.device import score_on_device

    ref = reference_runner(package.manifest, reference)  # first: a package without a source says so
    tok = package.tokenizer()
    ids = tok.encode(text).ids
    if len(ids) < 2:
        raise MobilizeError("the evaluation text is shorter than two tokens")
    pieces, skips, tops, lp_tops, lp_targets, argmaxes, targets = [], [], [], [], [], [], []
    for skip, piece in _chunks(tok, ids, chunk):  # the reference's rows kept as what the figures need (not 262k wide)
        lp = log_softmax(score(ref, piece[:-1]))[skip:]
        target = np.asarray(piece[skip + 1 :])
        k = min(KL_TOP, lp.shape[-1])
        top = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
        pieces.append(piece[:-1])
        skips.append(skip)
        tops.append(top)
        lp_tops.append(np.take_along_axis(lp, top, axis=-1))
        lp_targets.append(lp[np.arange(len(target)), target])
        argmaxes.append(lp.argmax(-1))
        targets.append(target)
    top, lp_top, target = np.concatenate(tops), np.concatenate(lp_tops), np.concatenate(targets)
    want = np.concatenate([top, target[:, None]], axis=1)
    prompts = [tok.encode(p).ids for p in PROMPTS]
    dev, continued, device = score_on_device(package.path, spec, python, pieces, skips, want, prompts, new_tokens,
                                             set(), threads, workdir)  # fmt: skip
    lp_pkg = dev["picked"].astype(np.float64) - dev["lse"][:, None]
    k = top.shape[1]  # (a vocabulary smaller than KL_TOP: all of it)
    p_ref, p_pkg = np.exp(lp_top), np.exp(lp_pkg[:, :k])
    rest_ref = np.clip(1.0 - p_ref.sum(-1), 1e-12, None)
    rest_pkg = np.clip(1.0 - p_pkg.sum(-1), 1e-12, None)
    kl = (p_ref * (lp_top - lp_pkg[:, :k])).sum(-1) + rest_ref * np.log(rest_ref / rest_pkg)
    sums = {"nll_package": -float(lp_pkg[:, -1].sum()), "nll_reference": -float(np.concatenate(lp_targets).sum()),
            "agree": float((dev["argmax"] == np.concatenate(argmaxes)).sum()), "kl": float(kl.sum()),
            "count": float(len(target))}  # fmt: skip
    matches = []
    for p, a in zip(prompts, continued, strict=True):
        b = greedy(ref, p, new_tokens)
        matches.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))))
    return {
        "reference": reference,
        "chunk": chunk,
        **_figures(sums),
        "kl_note": f"over the reference's top {KL_TOP} tokens, the rest as one: a lower bound of the full KL",
        "greedy_match": {"prompts": list(PROMPTS), "new_tokens": new_tokens, "matched": matches},
        "device": device,
    }


def _figures(sums: dict[str, float]) -> dict[str, Any]:
    n = sums["count"]
    ppl, ref = float(np.exp(sums["nll_package"] / n)), float(np.exp(sums["nll_reference"] / n))
    return {
        "tokens": int(n),
        "perplexity": ppl,
        "reference_perplexity": ref,
        "perplexity_increase": ppl / ref - 1.0,
        "top1_agreement": sums["agree"] / n,
        "mean_kl": sums["kl"] / n,
    }


def record(package_dir: Path, result: dict[str, Any]) -> None:
    """Write the result into the manifest (and the README's last section), keeping the README's hash true."""
    manifest = Manifest.read(package_dir)
    readme = package_dir / "README.md"
    text = readme.read_text().split("\n## Evaluation\n")[0].rstrip() + "\n"
    text += (
        f"\n## Evaluation\n\n`mobilize eval`, {result['tokens']} tokens: perplexity {result['perplexity']:.2f} against "
        f"the reference's {result['reference_perplexity']:.2f} ({result['perplexity_increase']:+.1%}), top-1 "
        f"agreement {result['top1_agreement']:.1%}, mean KL {result['mean_kl']:.4f}"
    )
    if "greedy_match" in result:
        g = result["greedy_match"]
        text += f"; greedy continuations match the reference for {g['matched']} of {g['new_tokens']} tokens"
    for split, r in result.get("splits", {}).items():
        text += f"; {split}: {r['tokens']} tokens, {r['perplexity_increase']:+.1%}, KL {r['mean_kl']:.4f}"
    text += ".\n"
    _replace(readme, text)
    files = {**manifest.files, "README.md": FileEntry(readme.stat().st_size, sha256_file(readme))}
    _replace(package_dir / MANIFEST, manifest.replace(evaluation=result, files=files).text())


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
