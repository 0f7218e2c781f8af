"""Tokenizer parity at export for a TFLite package with its LiteRT-LM bundle: the package's tokenizer.json (what
mobilize's runner and an app's own interpreter loop use) against the tokenizer LiteRT-LM's engine builds from the
bundle (its own C++ implementation, what an app on LiteRT-LM gets), on the shared strings (targets/parity.py), with
the BOS the engine puts before a session's first prompt. A mismatch stops the export in one line.

LiteRT-LM tokenizes only through an engine, which loads the model: a model larger than LIMIT is recorded as not
checked rather than loaded a second time at export."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mobilize.errors import MobilizeError, runtime_reason
from mobilize.targets.parity import first_difference, parity_strings

LIMIT = 1 << 30


def check_with_litert_lm(package: Path) -> dict[str, Any]:
    bundle = package / "model.litertlm"
    if not bundle.is_file():
        return {"litert-lm": "not checked: the package has no LiteRT-LM bundle (export with --bundle litertlm)"}
    if not (package / "tokenizer.json").is_file():
        return {"litert-lm": "not checked: the package has no tokenizer.json"}
    size = (package / "model.tflite").stat().st_size
    if size > LIMIT:
        return {"litert-lm": f"not checked: its engine would load the {size / 1e9:.1f} GB model to tokenize"}
    try:
        import litert_lm
    except ImportError:
        return {"litert-lm": "not checked: litert-lm-api is not installed"}
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(package / "tokenizer.json"))
    strings = parity_strings(ours)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory(prefix="mobilize-litert-lm-") as cache:
        try:
            engine = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(thread_count=1), cache_dir=cache)
            try:
                bos = [] if engine.bos_token_id is None else [engine.bos_token_id]
                theirs = [bos + [int(t) for t in engine.tokenize(s)] for s in strings]
            finally:
                engine.close()
        except Exception as e:  # its errors are RuntimeErrors with its message
            raise MobilizeError(f"LiteRT-LM cannot read this package's bundle: {runtime_reason(e)} "
                                "(--ignore-tokenizer-parity writes the package anyway)") from None
    first_difference("LiteRT-LM", strings, [ours.encode(s).ids for s in strings], theirs)
    return {"litert-lm": f"{len(strings)} strings encode the same (with the BOS the engine adds to a session)"}
