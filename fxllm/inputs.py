"""What users hand to ``LLM``: prompts (vLLM's ``TextPrompt`` / ``TokensPrompt``) and conversations."""

from __future__ import annotations

from typing import Any, TypedDict

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    """A prompt as text, tokenized with the model's tokenizer."""

    prompt: str
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """A prompt as token ids; ``prompt`` (optional) is its text for the output."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


# One prompt: text, or a TextPrompt / TokensPrompt dict.
PromptType = str | TextPrompt | TokensPrompt | dict[str, Any]


def is_token_list(value: Any) -> bool:
    """A non-empty list of token ids (ints): one prompt, as vLLM reads it."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def as_prompt_list(prompts: Any) -> list[PromptType]:
    """One prompt or a list of them; a list of ints is one prompt of token ids."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if is_token_list(prompts):
        return [{"prompt_token_ids": list(prompts)}]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given: pass a string or a non-empty list of prompts")
        return [{"prompt_token_ids": list(p)} if is_token_list(p) else p for p in prompts]
    raise TypeError(
        f"prompts must be a string, a dict (TokensPrompt/TextPrompt) or a list of them, got {type(prompts).__name__}"
    )


def as_conversations(messages: Any) -> list[list[dict[str, Any]]]:
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return [messages]
    if isinstance(messages, list) and messages and all(
        isinstance(c, list) and c and all(isinstance(m, dict) for m in c) for c in messages
    ):
        return messages
    raise TypeError(
        "messages must be a conversation (a non-empty list of {'role': ..., 'content': ...} dicts) "
        "or a non-empty list of conversations"
    )
