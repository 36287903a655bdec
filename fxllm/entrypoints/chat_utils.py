"""``load_chat_template``: a chat template from a file, or given inline."""

from __future__ import annotations

from pathlib import Path


def load_chat_template(chat_template: str | Path | None) -> str | None:
    if chat_template is None:
        return None
    path = Path(chat_template).expanduser()
    if path.is_file():
        return path.read_text()
    if isinstance(chat_template, Path) or "{" not in str(chat_template):
        raise FileNotFoundError(f"chat_template={str(chat_template)!r} is neither a Jinja template nor an existing file")
    return str(chat_template)
