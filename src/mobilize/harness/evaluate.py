"""`mobilize eval`: how far a package's predictions are from the reference model's (fp32, on the package's own
source checkpoint), on a text and on greedy continuations of a few prompts. The reference is the one decoder in
numpy (no torch needed), or transformers when asked (`--reference transformers`, an independent implementation)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.harness.accuracy import log_softmax
from mobilize.harness.runner import greedy, score

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "bench" / "data" / "river.txt"
PROMPTS = ("The capital of France is", "Water boils at a temperature of", "Once upon a time, there was a")


def reference_source(manifest: dict) -> Path:
    """The checkpoint the package was exported from, as a path transformers can load."""
    from mobilize.frontend.loader import open_checkpoint

    source = manifest["source"]
    if source["format"] == "random":
        raise MobilizeError("the package was exported with --random-weights: there is no reference model to compare")
    ckpt = open_checkpoint(source["id"])
    first = Path(ckpt.files[0])
    return first if ckpt.format == "gguf" else first.parent


REFERENCES = ("numpy", "transformers")


def reference_runner(manifest: dict, reference: str):
    """The reference runner for a package's source: numpy (mobilize's decoder, torch-free) or transformers."""
    if reference not in REFERENCES:
        raise MobilizeError(f"unknown --reference {reference!r} (known: {', '.join(REFERENCES)})")
    source = reference_source(manifest)
    if reference == "numpy":
        from mobilize.harness.numpy_runner import NumpyRunner

        return NumpyRunner.for_source(str(source))
    try:
        from mobilize.harness.reference import ReferenceRunner

        return ReferenceRunner.for_path(source)
    except ModuleNotFoundError as e:
        raise MobilizeError(
            f"--reference transformers needs {e.name} (pip install 'mobilize[reference]'); "
            "the default numpy reference needs nothing more"
        ) from None


def evaluate(
    package, text: str, chunk: int = 256, new_tokens: int = 16, threads: int = 0, reference: str = "numpy"
) -> dict[str, Any]:
    ref = reference_runner(package.manifest, reference)  # first: a package without a source says so
    tok = package.tokenizer()
    ids = tok.encode(text).ids
    if len(ids) < 2:
        raise MobilizeError("the evaluation text is shorter than two tokens")
    ours = package.runner(threads)
    # Every chunk starts as the text does: with the BOS token where the tokenizer adds one (a model like
    # Gemma is far from itself mid-text without it, and so is any int8-activation kernel: differences
    # between kernels there are not the package's error). The BOS row itself is not scored.
    bos = tok.encode("").ids[:1]  # (an empty text may also get an EOS)
    nll = {"package": 0.0, "reference": 0.0}
    agree, kl, count = 0, 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        prefix = bos if start and bos and ids[0] == bos[0] else []
        piece = prefix + ids[start : start + chunk + 1]
        if len(piece) - len(prefix) < 2:
            break
        lp_ours = log_softmax(score(ours, piece[:-1]))[len(prefix) :]
        lp_ref = log_softmax(score(ref, piece[:-1]))[len(prefix) :]
        target = np.asarray(piece[len(prefix) + 1 :])
        rows = np.arange(len(target))
        nll["package"] -= float(lp_ours[rows, target].sum())
        nll["reference"] -= float(lp_ref[rows, target].sum())
        agree += int((lp_ours.argmax(-1) == lp_ref.argmax(-1)).sum())
        kl += float((np.exp(lp_ref) * (lp_ref - lp_ours)).sum())
        count += len(target)
    matches = []
    for prompt in PROMPTS:
        p = tok.encode(prompt).ids
        a, b = greedy(ours, p, new_tokens), greedy(ref, p, new_tokens)
        matches.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
    ppl = {k: float(np.exp(v / count)) for k, v in nll.items()}
    return {
        "reference": reference,
        "tokens": count,
        "chunk": chunk,
        "perplexity": ppl["package"],
        "reference_perplexity": ppl["reference"],
        "perplexity_increase": ppl["package"] / ppl["reference"] - 1.0,
        "top1_agreement": agree / count,
        "mean_kl": kl / count,
        "greedy_match": {"prompts": list(PROMPTS), "new_tokens": new_tokens, "matched": matches},
    }


def record(package_dir: Path, result: dict[str, Any]) -> None:
    """Write the result into the manifest (and the README's last section), keeping the README's hash true."""
    from mobilize.package.verify import MANIFEST, sha256_file

    manifest = json.loads((package_dir / MANIFEST).read_text())
    manifest["evaluation"] = result
    readme = package_dir / "README.md"
    text = readme.read_text().split("\n## Evaluation\n")[0].rstrip() + "\n"
    text += (
        f"\n## Evaluation\n\n`mobilize eval`, {result['tokens']} tokens: perplexity {result['perplexity']:.2f} against "
        f"the reference's {result['reference_perplexity']:.2f} ({result['perplexity_increase']:+.1%}), top-1 "
        f"agreement {result['top1_agreement']:.1%}, mean KL {result['mean_kl']:.4f}; greedy continuations match "
        f"the reference for {result['greedy_match']['matched']} of {result['greedy_match']['new_tokens']} tokens.\n"
    )
    _replace(readme, text)
    manifest["files"]["README.md"] = {"bytes": readme.stat().st_size, "sha256": sha256_file(readme)}
    _replace(package_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
