"""What users hand to ``LLM``: prompts, conversations and bad words, read with the model's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PromptType = str | dict[str, Any]


def tokenize_bad_words(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Token sequences of each bad word, as it would appear mid-text and at the start
    (with and without a leading space), as vLLM does."""
    sequences: list[list[int]] = []
    for word in bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


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


def as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given: pass a string or a non-empty list of prompts")
        return list(prompts)
    raise TypeError(
        f"prompts must be a string, a dict (TokensPrompt/TextPrompt) or a list of them, got {type(prompts).__name__}"
    )


def load_tokenizer(tokenizer: str | None, model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    source = tokenizer or str(model_dir)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a tokenizer from {source}: {error}") from error


def collect_eos_token_ids(tokenizer: Any, hf_config: Any, generation_config: dict) -> tuple[int, ...]:
    """EOS ids from the tokenizer, config.json and generation_config.json (each may be a list)."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(hf_config, "eos_token_id", None),
        generation_config.get("eos_token_id"),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))
