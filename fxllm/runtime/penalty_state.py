"""Token counts for presence, frequency and repetition penalties, kept on the device.

A request with penalties gets a row of ``counts`` (its output tokens) and ``seen``
(prompt and output tokens) the first time it samples; the row is filled once from what
the host knows, then every sampled token is added on the device right after it is
drawn, so no step rebuilds a request's history and the host never has to see a token
before the next step can use it. Rows of finished requests are reused. Rows without
penalties point at a spare row whose contents never matter (their penalties are
neutral).
"""

from __future__ import annotations

import torch

from fxllm.runtime.request import Request


class PenaltyState:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.counts: torch.Tensor | None = None  # [max_rows + 1, V] float32; allocated on first use
        self.seen: torch.Tensor | None = None  # [max_rows + 1, V] bool
        self._owners: list[Request | None] = [None] * max_rows
        self._row_of: dict[Request, int] = {}

    @property
    def spare_row(self) -> int:
        return self.max_rows

    def rows(self, requests: list[Request]) -> torch.Tensor:
        """[B] each request's row (the spare row for requests without penalties)."""
        if self.counts is None:
            shape = (self.max_rows + 1, self.vocab_size)
            self.counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        rows = []
        for request in requests:
            if not request.sampling_params.uses_penalties:
                rows.append(self.spare_row)
                continue
            row = self._row_of.get(request)
            if row is None:
                row = self._assign(request)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def record(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count each row's sampled token (on the device, queued after the sampling)."""
        self.counts.index_put_((rows, token_ids), torch.ones_like(token_ids, dtype=torch.float32), accumulate=True)
        self.seen[rows, token_ids] = True

    def _assign(self, request: Request) -> int:
        row = self._free_row()
        self._owners[row] = request
        self._row_of[request] = row
        outputs = request.output_token_ids
        self.counts[row].zero_()
        self.seen[row].zero_()
        if outputs:
            ids = torch.tensor(outputs, dtype=torch.long, device=self.device)
            self.counts[row].index_put_((ids,), torch.ones(len(outputs), device=self.device), accumulate=True)
        self.seen[row, torch.tensor(request.all_token_ids, dtype=torch.long, device=self.device)] = True
        return row

    def _free_row(self) -> int:
        for row, owner in enumerate(self._owners):
            if owner is None or owner.finished:
                if owner is not None:
                    del self._row_of[owner]
                return row
        # Every row belongs to a running request: more requests with penalties sample in one
        # step than max_num_seqs, which the scheduler never schedules.
        raise RuntimeError(f"more than {self.max_rows} running requests with penalties")
