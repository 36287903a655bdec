"""Conversations -> prompt text and images, through the tokenizer's chat template.

Messages follow OpenAI's shape: ``content`` is a string, or a list of parts
(``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``,
``{"type": "image_pil", "image_pil": image}``, ``{"type": "image", "image": image}``,
``{"type": "video", "video": frames}``). A template that loops over a message's content
parts (Qwen2-VL's, for one) gets them as parts, with each image or video as a
placeholder part; a template that reads a string gets the texts joined
(``chat_template_content_format``: "auto" decides from the template itself). The
images and videos come back as the prompt's ``multi_modal_data``, in order.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTENT_FORMATS = ("auto", "string", "openai")
_IMAGE_PART_TYPES = ("image_url", "image_pil", "image")
_VIDEO_PART_TYPES = ("video", "video_url")


@dataclass
class RenderedChat:
    text: str
    multi_modal_data: dict[str, list[Any]] = field(default_factory=dict)


def render_conversation(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    index: int,
    chat_template: str | None,
    content_format: str,
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None,
) -> RenderedChat:
    """One conversation's prompt text (special tokens included) and its images and videos."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            "the tokenizer has no chat template: pass chat_template=... (a Jinja string) to chat() or to LLM(...)"
        )
    if content_format == "auto":
        content_format = "openai" if template_loops_over_content(template) else "string"
    media: dict[str, list[Any]] = {}
    messages = [_message(message, index, number, content_format, media) for number, message in enumerate(conversation)]
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **template_kwargs,
        )
    except Exception as error:  # jinja's own errors, and the template's raise_exception()
        raise ValueError(
            f"conversation {index}: the chat template failed: {type(error).__name__}: {error}"
        ) from error
    return RenderedChat(text, media)


def _message(
    message: dict[str, Any], conversation: int, number: int, content_format: str, media: dict[str, list[Any]]
) -> dict[str, Any]:
    where = f"conversation {conversation}, message {number}"
    if not isinstance(message.get("role"), str):
        raise ValueError(f"{where} has no 'role' (a string such as 'user'): got {message.get('role')!r}")
    if "content" not in message and "tool_calls" not in message:
        raise ValueError(f"{where} ({message['role']}) has no 'content'")
    content = message.get("content")
    if content is None:
        if "tool_calls" in message:
            return dict(message)
        raise ValueError(f"{where} ({message['role']}): 'content' is None; give a string or a list of content parts")
    if isinstance(content, str):
        return dict(message)
    if not isinstance(content, list):
        raise TypeError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")
    parts = [_part(part, f"{where}, part {i}", media) for i, part in enumerate(content)]
    if content_format == "string":
        # Images and videos still reach the model; the template sees only the texts.
        text = "\n".join(part["text"] for part in parts if part["type"] == "text")
        return {**message, "content": text}
    return {**message, "content": parts}


def _part(part: Any, where: str, media: dict[str, list[Any]]) -> dict[str, Any]:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise TypeError(f"{where} must be a dict with a 'type', got {part!r}")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: a text part needs 'text' (a string)")
        return {"type": "text", "text": part["text"]}
    if kind in _IMAGE_PART_TYPES:
        media.setdefault("image", []).append(_image(part, kind, where))
        return {"type": "image"}
    if kind in _VIDEO_PART_TYPES:
        if kind == "video_url":
            raise ValueError(f"{where}: video_url parts are not supported; pass the frames as {{'type': 'video', 'video': frames}}")
        media.setdefault("video", []).append(part.get("video"))
        return {"type": "video"}
    raise ValueError(f"{where}: unknown content part type {kind!r}; known: text, {', '.join(_IMAGE_PART_TYPES + _VIDEO_PART_TYPES)}")


def _image(part: dict[str, Any], kind: str, where: str) -> Any:
    if kind != "image_url":
        return part.get(kind)
    source = part.get("image_url")
    url = source.get("url") if isinstance(source, dict) else source
    if not isinstance(url, str):
        raise ValueError(f"{where}: image_url needs a 'url' (a data: URL or a local path)")
    from PIL import Image

    if url.startswith("data:"):
        _, _, payload = url.partition(",")
        return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")
    if url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: fxllm does not download images ({url}); pass a data: URL or a local path")
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no image file at {path}")
    return Image.open(path).convert("RGB")


def template_loops_over_content(template: str) -> bool:
    """Whether the Jinja template iterates over a message's ``content`` (it reads parts, as
    OpenAI sends them), found in the template's syntax tree."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False  # rendering reports it
    for loop in tree.find_all(nodes.For):
        iterated = loop.iter
        while isinstance(iterated, nodes.Filter) and iterated.node is not None:
            iterated = iterated.node
        if isinstance(iterated, nodes.Getitem) and isinstance(iterated.arg, nodes.Const) and iterated.arg.value == "content":
            return True
        if isinstance(iterated, nodes.Getattr) and iterated.attr == "content":
            return True
    return False
