"""Incremental detokenization: text grows as tokens arrive, multi-byte characters intact."""

from __future__ import annotations

from typing import Any

# Prompt tokens fed to the stream first, so the first output token decodes in context
# (e.g. its leading space) without decoding the whole prompt.
PROMPT_CONTEXT_TOKENS = 5
# From this many tokens on, text never read before is decoded in one call of the
# tokenizer (microseconds per token fewer than stepping the stream token by token).
BULK_DECODE_MIN_TOKENS = 16
INCOMPLETE_CHARACTER = "\ufffd"  # what decoding yields for the bytes of a character cut short


class IncrementalDetokenizer:
    """Wraps the tokenizers library's DecodeStream; falls back to full decodes for slow tokenizers.

    Tokens are decoded when the text is read, not when they arrive: a request with stop
    strings reads it every token (the stream, one step a token), one without once, when it
    finishes (one decode of all its tokens, where that gives the stream's text)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool):
        self._text = ""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self._output_ids: list[int] = []
        self._decoded = 0  # output tokens already in the text
        self._streamed = 0  # output tokens the stream has stepped through
        self._context = self._whole_characters(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._backend is not None:
            self._stream = self._new_stream()

    def _whole_characters(self, context: list[int]) -> list[int]:
        """``context`` without trailing tokens that end inside a character: their bytes belong to
        the prompt, and decoding them with the output's would leak them into its text."""
        decode = self._backend.decode if self._backend is not None else self._tokenizer.decode
        while context and decode(context, skip_special_tokens=self._skip_special_tokens).endswith(INCOMPLETE_CHARACTER):
            context = context[:-1]
        return context

    def _new_stream(self):
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=self._context, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> None:
        self._output_ids.append(token_id)

    @property
    def num_undecoded(self) -> int:
        """Output tokens not yet in the text (decoded when it is next read)."""
        return len(self._output_ids) - self._decoded

    @property
    def text(self) -> str:
        if self._decoded == len(self._output_ids):
            return self._text
        if self._backend is None:
            self._text = self._tokenizer.decode(self._output_ids, skip_special_tokens=self._skip_special_tokens)
        elif self._streamed == 0 and len(self._output_ids) >= BULK_DECODE_MIN_TOKENS and self._decode_in_bulk():
            pass  # the usual offline request: read once, when it finishes
        else:
            if self._streamed != self._decoded:  # decoded in bulk before: the stream starts over
                self._stream, self._streamed, self._text = self._new_stream(), 0, ""
            for token_id in self._output_ids[self._streamed :]:
                chunk = self._stream.step(self._backend, token_id)
                if chunk is not None:
                    self._text += chunk
            self._streamed = len(self._output_ids)
        self._decoded = len(self._output_ids)
        return self._text

    @property
    def final_text(self) -> str:
        """The whole output's text once no token will follow: the stream's, plus the bytes of a
        last character cut short (decoded as replacement characters, as a plain decode does)."""
        text = self.text
        if self._backend is None or self._decoded == 0:
            return text
        skip = self._skip_special_tokens
        context = self._backend.decode(self._context, skip_special_tokens=skip)
        full = self._backend.decode(self._context + self._output_ids, skip_special_tokens=skip)
        return full[len(context):] if full.startswith(context) and len(full) - len(context) > len(text) else text

    def _decode_in_bulk(self) -> bool:
        """The text the stream would give, from two decodes of the whole; False (nothing
        set) where they might differ from it: any character cut short, in the output (the
        stream holds its bytes back) or in the prompt's context (whose stray bytes the
        stream may join to the output), or a context whose text the output changes."""
        skip = self._skip_special_tokens
        context = self._backend.decode(self._context, skip_special_tokens=skip)
        full = self._backend.decode(self._context + self._output_ids, skip_special_tokens=skip)
        if not full.startswith(context) or INCOMPLETE_CHARACTER in full:
            return False
        self._text = full[len(context):]
        return True


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
