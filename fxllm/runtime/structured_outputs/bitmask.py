"""Each step's token bitmask of the constrained rows, filled on the host and applied on the device.

Bit ``t % 32`` of word ``t // 32`` of a row says whether token ``t`` may come next
(xgrammar's layout). Only the rows of constrained requests are filled, into the first
rows of a persistent host buffer, copied once to the device, and expanded there to
mask those rows' logits: a step without constrained requests does none of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxllm.runtime.request import Request
from fxllm.utils import cdiv

BITS_PER_WORD = 32


@dataclass
class StepBitmask:
    """The masks of one step: ``bitmask[i]`` belongs to logits row ``rows[i]``."""

    bitmask: torch.Tensor  # [K, words] int32 on the device
    rows: torch.Tensor  # [K] int64 on the device

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of the constrained rows to -inf, in place."""
        apply_token_bitmask(logits, self.bitmask, self.rows)


class GrammarBitmask:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.max_rows = max_rows
        self.words = cdiv(vocab_size, BITS_PER_WORD)
        self.device = device
        self.host: torch.Tensor | None = None  # [max_rows, words] int32; allocated on first use
        self.on_device: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def fill(self, requests: list[Request]) -> StepBitmask | None:
        """The masks of the rows whose grammar restricts the next token; None when there are none."""
        constrained = [(row, r.grammar) for row, r in enumerate(requests) if r.grammar is not None]
        if not constrained:
            return None
        self._allocate()
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of the host buffer is done
        rows = []
        for row, grammar in constrained:
            if grammar.fill_bitmask(self.host, len(rows)):
                rows.append(row)
        if not rows:
            return None  # every constrained row may take any token this step
        count = len(rows)
        if self.on_device is not self.host:
            self.on_device[:count].copy_(self.host[:count], non_blocking=True)
            self._copied.record()
        return StepBitmask(self.on_device[:count], torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True))

    def _allocate(self) -> None:
        if self.host is not None:
            return
        pin = self.device.type == "cuda"
        self.host = torch.empty(self.max_rows, self.words, dtype=torch.int32, pin_memory=pin)
        self.on_device = self.host if not pin else torch.empty_like(self.host, device=self.device)
        self._copied = torch.cuda.Event() if pin else None


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """``logits[rows[i], t] = -inf`` where bit t of ``bitmask[i]`` is 0. The bitmask covers the
    model's whole vocabulary: ids past the tokenizer's (embedding padding) have no bit set."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bitmask.device)
    vocab_size = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab_size].bool()  # [K, V]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
