"""Evaluation text sets: several kinds of text, most of them written by others, in two splits.

`broad` is what accuracy claims are made on. Its `dev` split (the project's own prose and a short licence) is
the only one looked at while choosing a recipe's forms; `held-out` (licences Debian ships in every install,
Python's own source and reference documentation, a dialogue written after the recipes were fixed) is
reported, never tuned on. The texts other projects wrote are read where this machine has them (never copied
into mobilize), each capped at `max_tokens`, and their sha256 goes into the result so that two figures are
compared on the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
from collections.abc import Callable
from pathlib import Path

from mobilize.errors import MobilizeError

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"
LICENSES = Path("/usr/share/common-licenses")  # Debian's base-files: on every Debian and Ubuntu install


def _stdlib(name: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / name


def _reference_manual() -> str:
    """Python's language reference (the text `help()` shows), as the running Python ships it."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in ("compound", "execmodel", "exceptions", "import", "naming"))


@dataclasses.dataclass(frozen=True)
class Text:
    name: str
    kind: str  # prose, dialogue, legal, technical, code
    split: str  # "dev" (may inform recipe choices) or "held-out" (reported only)
    origin: str  # who wrote it
    read: Callable[[], str]


def _file(path: Path) -> Callable[[], str]:
    def read() -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MobilizeError(f"evaluation text {path} is not readable here ({getattr(e, 'strerror', e)})") from None

    return read


TEXT_SETS: dict[str, list[Text]] = {
    "broad": [
        Text("river", "prose", "dev", "mobilize", _file(DATA / "river.txt")),
        Text("artistic-license", "legal", "dev", "Debian (/usr/share/common-licenses)", _file(LICENSES / "Artistic")),
        Text("dialogue", "dialogue", "held-out", "mobilize, after the recipes", _file(DATA / "dialogue.txt")),
        Text("gpl-3", "legal", "held-out", "Debian (/usr/share/common-licenses)", _file(LICENSES / "GPL-3")),
        Text("apache-2.0", "legal", "held-out", "Debian (/usr/share/common-licenses)", _file(LICENSES / "Apache-2.0")),
        Text("python-reference", "technical", "held-out", "Python (pydoc_data)", _reference_manual),
        Text("python-textwrap", "code", "held-out", "Python (the standard library)", _file(_stdlib("textwrap.py"))),
    ]
}


def text_set(name: str) -> list[Text]:
    if name not in TEXT_SETS:
        raise MobilizeError(f"unknown text set {name!r} (known: {', '.join(TEXT_SETS)})")
    return TEXT_SETS[name]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
