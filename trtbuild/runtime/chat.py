"""Chat templates from the tokenizer files, rendered with jinja2 as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

from trtbuild.errors import TrtbuildError


def load_chat_template(tokenizer_dir: str | Path) -> tuple[str | None, dict]:
    """(template or None, tokenizer_config) from chat_template.jinja or tokenizer_config.json."""
    d = Path(tokenizer_dir)
    cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(), cfg
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template, cfg


def _token_text(value) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def apply_chat_template(tokenizer_dir: str | Path, messages: list[dict[str, str]],
                        add_generation_prompt: bool = True) -> str:
    """Render messages into the prompt text the model was trained on."""
    template, cfg = load_chat_template(tokenizer_dir)
    if template is None:
        raise TrtbuildError(f"{tokenizer_dir} has no chat template; drop the chat-template option")
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise TrtbuildError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")))
