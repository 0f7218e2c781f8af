"""Chat: a package's chat template (carried from the source into tokenizer_config.json) rendered as
transformers renders it (a sandboxed Jinja environment with its globals), tokenized as transformers'
`apply_chat_template` tokenizes it (the template writes its own special tokens: none are added)."""

from __future__ import annotations

from typing import Any

from mobilize.errors import MobilizeError
from mobilize.safe_io import read_json


def chat_template(package) -> tuple[str, dict[str, Any]]:
    """(the template, tokenizer_config.json) of a package; one line if it has none."""
    config_file = package.path / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # a list of named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)  # fmt: skip
    if not isinstance(template, str) or not template.strip():
        raise MobilizeError(f"{package.path} has no chat template (its source had none); run it without --chat")
    return template, config


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def render(package, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template, config = chat_template(package)

    def raise_exception(message: str):
        raise MobilizeError(f"the chat template refused the conversation: {str(message)[:200]}")

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **{k: v or "" for k, v in specials.items()}
        )
    except jinja2.TemplateError as e:
        raise MobilizeError(f"the package's chat template cannot be rendered ({type(e).__name__}: {e})") from None


def chat_ids(package, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of a conversation, ready for the assistant's turn."""
    return package.tokenizer().encode(render(package, messages), add_special_tokens=False).ids


def end_of_turn_ids(package) -> set[int]:
    """Tokens that end an assistant's turn besides EOS: the special tokens the template writes after a message
    (e.g. <end_of_turn>, <|im_end|>, <|eot_id|>), found by rendering a one-message reply."""
    tok = package.tokenizer()
    marker = "\u2063reply\u2063"
    text = render(package, [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], False)
    after = text.split(marker, 1)[1] if marker in text else ""
    added = tok.get_added_tokens_decoder()
    return {i for i in tok.encode(after, add_special_tokens=False).ids if i in added and added[i].special}
