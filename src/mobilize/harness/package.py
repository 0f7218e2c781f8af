"""Open an exported package: its manifest, its tokenizer, and a runner over its model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mobilize.errors import MobilizeError
from mobilize.manifest import Manifest
from mobilize.package.verify import verify_package
from mobilize.safe_io import read_json
from mobilize.targets.registry import runtimes


@dataclasses.dataclass
class Package:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, key: Path | None = None) -> Package:
        """A package, verified first (every file against its manifest sha256; with `key`, the manifest's
        signature): a tampered or truncated package is refused before anything is loaded from it."""
        path = Path(path)
        manifest = verify_package(path, key=key) if verify or key is not None else Manifest.read(path)
        runtimes(manifest.format)  # a format this mobilize knows
        return cls(path, manifest)

    def tokenizer(self):
        from tokenizers import Tokenizer

        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise MobilizeError(f"{self.path} has no tokenizer.json (exported from a source without a tokenizer)")
        return Tokenizer.from_file(str(file))

    def eos_ids(self, tokenizer) -> set[int]:
        ids: set[int] = set()
        cfg_file = self.path / "tokenizer_config.json"
        if cfg_file.is_file():
            token = read_json(cfg_file).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and token and tokenizer.token_to_id(token) is not None:
                ids.add(tokenizer.token_to_id(token))
        gen = self.path / "generation_config.json"
        if gen.is_file():
            eos = read_json(gen).get("eos_token_id")
            ids |= {i for i in (eos if isinstance(eos, list) else [eos]) if type(i) is int}
        return ids

    def runner(self, threads: int = 0, adapters: list[Path] = (), runtime: str | None = None,
               checked: dict[str, dict[str, np.ndarray]] | None = None):  # fmt: skip
        """A runner over the package in `runtime` (None: its format's default; targets/<format>/runtime.py, imported
        here: a device has only its format's runtime); `threads` 0: the package's own (its preset's device's big
        cores, as its genai_config.json asks). `adapters`: LoRA adapter files, each checked against the package's
        slots and loaded (named by file stem), the first one active; or `checked`: what `adapter_files` made of
        them already."""
        available = runtimes(self.manifest.format)
        name = runtime or next(iter(available))
        if name not in available:
            raise MobilizeError(f"--runtime {name} does not run {self.manifest.format} packages (its runtimes: "
                                f"{', '.join(available)})")  # fmt: skip
        chosen = available[name]
        if chosen.runner is None:
            raise MobilizeError(f"--runtime {name} is measured by its own engine: `mobilize bench` only")
        if checked is None:  # (a device's copy has no package/adapter.py: no adapters there)
            checked = self.adapter_files(adapters) if adapters else {}
        return chosen.runner(self.path, self.manifest, threads or self.manifest.target.threads, checked)

    def adapter_files(self, adapters: list[Path]) -> dict[str, dict[str, np.ndarray]]:
        """name -> tensors of each adapter file, read once and checked against this package (made for it, its
        slots' names and shapes)."""
        from mobilize.package.adapter import adapter_name, check_adapter

        named: dict[str, dict[str, np.ndarray]] = {}
        for path in adapters:
            name = adapter_name(path, self.manifest)
            if name in named:
                raise MobilizeError(f"--adapter {path}: two adapters named {name!r}")
            named[name] = check_adapter(path, self.path, self.manifest)
        return named


def stream_greedy(
    package: Package, prompt: str, max_new_tokens: int, threads: int = 0, ids: list[int] | None = None,
    runner=None, stop: set[int] | None = None,
) -> Iterator[str]:
    """Yield the text of each new token as greedy decoding produces it (`ids`: the prompt already tokenized;
    `stop`: more token ids that end the reply, a chat template's end of turn)."""
    tok = package.tokenizer()
    eos = package.eos_ids(tok) | (stop or set())
    try:
        ids = tok.encode(prompt).ids if ids is None else ids
    except Exception as e:  # the Rust tokenizer on text it cannot take (unpaired surrogates from a non-UTF-8 argv)
        raise MobilizeError(f"the prompt cannot be tokenized ({type(e).__name__}); is it valid UTF-8?") from None
    if not ids:
        raise MobilizeError("the prompt gives no tokens")
    room = package.manifest.target.max_seq_len
    if len(ids) >= room:
        raise MobilizeError(f"the prompt has {len(ids)} tokens; this package's KV cache holds {room} positions")
    max_new_tokens = min(max_new_tokens, room - len(ids))  # generation stops where the cache ends
    runner = runner or package.runner(threads)
    generated: list[int] = []
    # Decode the prompt and continuation together, so spacing between them comes from the tokenizer.
    shown = tok.decode(ids)
    token = int(np.argmax(runner.prefill(ids)[-1]))
    while len(generated) < max_new_tokens and token not in eos:
        generated.append(token)
        text = tok.decode(ids + generated)
        if not text.endswith("\ufffd") and text.startswith(shown):  # wait for a whole character
            yield text[len(shown) :]
            shown = text
        if len(generated) < max_new_tokens:
            token = int(np.argmax(runner.decode(token)))
