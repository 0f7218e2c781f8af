"""Tokenizer parity at export, the part every target shares: the strings checked (leading and repeated whitespace,
digits, emoji, code, other scripts, the special tokens written out) and the one-line error when a runtime's own
tokenizer encodes some of them otherwise than the package's tokenizer.json. Each target compares with the tokenizer
its runtime brings (ONNX: GenAI's, targets/onnx/tokenizer_parity.py; TFLite: LiteRT-LM's,
targets/tflite/tokenizer_parity.py)."""

from __future__ import annotations

from mobilize.errors import MobilizeError

_BODIES = [
    "Hello world", "the river's bank.", "12345", "1 + 2 = 3", "3.14159 and 2,718", "a  b", "trailing ",
    "émoji 🙂 ok", "🙂🙂🙂", "日本語のテキスト", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "한국어 문장",
    "def f(x):\n    return x * 2\n", "if (a && b) { c[i] = 0; }", "x", "", "\n", "mixed\tTABS\tand  spaces",
    "ÀÉÎÕÜ àéîõü", "https://example.org/a?b=c#d", "line one\nline two\n\nline four", "   ", "0.25% of 1,000",
    "«quotes» and “more”", "CamelCaseWord snake_case_word", "e-mail: someone@example.com", "$100.00 (USD)",
    "tab\tend", "\u00a0no-break space", "\r\nwindows line\r\n", "ﬁ ligature", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]  # fmt: skip
_PREFIXES = ("", " ", "  ", "\t", "\n", " \n ")


def parity_strings(tokenizer) -> list[str]:
    """The checked strings: every body after each whitespace prefix, with a trailing space, and the texts of the
    `tokenizers.Tokenizer`'s special tokens (up to 32) inside a sentence."""
    specials = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special})[:32]
    strings = [p + b for p in _PREFIXES for b in _BODIES] + [b + " " for b in _BODIES]
    return strings + [f"{s}text" for s in specials] + [f"a {s} b" for s in specials] + ["".join(specials)]


def first_difference(runtime: str, strings: list[str], mine: list[list[int]], theirs: list[list[int]]) -> None:
    """Raise the one-line error naming how many strings `runtime` encodes otherwise and the first of them."""
    wrong = [(s, a, b) for s, a, b in zip(strings, mine, theirs, strict=True) if a != b]
    if not wrong:
        return
    s, a, b = wrong[0]
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 2)
    raise MobilizeError(
        f"tokenizer parity: {runtime} encodes {len(wrong)} of {len(strings)} strings differently from "
        f"the package's tokenizer.json, e.g. {s!r} from token {i}: {b[lo : i + 4]} against {a[lo : i + 4]} "
        f"({len(b)} and {len(a)} tokens); an app would feed the model other tokens (--ignore-tokenizer-parity "
        "writes the package anyway)"
    )
