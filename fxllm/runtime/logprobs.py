"""Logprobs of one position on the host, and the ``{token_id: Logprob}`` dicts users read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fxllm.outputs import Logprob


@dataclass
class TokenLogprobs:
    """The chosen token (sampled, or the prompt's next token) with its logprob and rank, and
    the top-N tokens of the raw distribution, most likely first."""

    chosen: int
    chosen_logprob: float
    chosen_rank: int  # 1 + the number of tokens strictly more likely
    top_ids: list[int]
    top_logprobs: list[float]

    def as_dict(self, decode: Callable[[int], str] | None) -> dict[int, Logprob]:
        """As vLLM orders it: the chosen token first, then the top-N (ranks 1..N)."""
        text = decode or (lambda token_id: None)
        entries = {self.chosen: Logprob(self.chosen_logprob, self.chosen_rank, text(self.chosen))}
        for rank, (token_id, logprob) in enumerate(zip(self.top_ids, self.top_logprobs), start=1):
            if token_id not in entries:
                entries[token_id] = Logprob(logprob, rank, text(token_id))
        return entries
