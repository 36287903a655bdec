"""Incremental detokenization: text grows as tokens arrive, multi-byte characters intact."""

from __future__ import annotations

from typing import Any

# Prompt tokens fed to the stream first, so the first output token decodes in context
# (e.g. its leading space) without decoding the whole prompt.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Wraps the tokenizers library's DecodeStream; falls back to full decodes for slow tokenizers.

    Tokens are decoded when the text is read, not when they arrive: a request with stop
    strings reads it every token, one without only at the end, which keeps
    detokenization out of the engine's step for most offline requests. The text is the
    same either way (the same stream steps, later)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool):
        self._text = ""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self._output_ids: list[int] = []
        self._decoded = 0  # output tokens already in the text
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            context = prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)

    def add(self, token_id: int) -> None:
        self._output_ids.append(token_id)

    @property
    def text(self) -> str:
        if self._decoded == len(self._output_ids):
            return self._text
        if self._backend is None:
            self._text = self._tokenizer.decode(self._output_ids, skip_special_tokens=self._skip_special_tokens)
        else:
            for token_id in self._output_ids[self._decoded :]:
                chunk = self._stream.step(self._backend, token_id)
                if chunk is not None:
                    self._text += chunk
        self._decoded = len(self._output_ids)
        return self._text


def find_stop_string(text: str, new_text_from: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends in the text added since ``new_text_from``.

    A stop string may straddle tokens, so the search starts len(stop) - 1 characters
    before the new text."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, new_text_from - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
