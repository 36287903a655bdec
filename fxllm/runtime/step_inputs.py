"""A step's model inputs: built on the host with numpy, copied once into persistent device buffers.

The device buffers never move, so CUDA graphs captured on views of them replay
with each step's values (docs/ARCHITECTURE.md, contract 6). On CUDA the host side is pinned and
copies are non-blocking; on CPU host and device buffers are the same tensors.

Padding (to a CUDA-graph size): padded tokens get slot -1 (the KV write skips them)
and position 0; a decode-only step is padded with empty requests of one token and
seq_len 0, so attention reads nothing for them and the decode kernel still sees
one token per request.

M-RoPE models (``mrope=True``) take positions [3, T] instead: a transposed view of a
[max_tokens, 3] buffer, so its strides (1, 3) are the same for every T, as in the
graph captured at start-up. Tokens of a prompt take the rows the multimodal
processor computed, later tokens their index plus the request's M-RoPE delta in
every row, text-only requests their index; padded tokens position 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fxllm.models.mrope import NUM_MROPE_ROWS
from fxllm.forward_context import AttentionMetadata, GraphDispatch
from fxllm.runtime.request import Request
from fxllm.runtime.scheduler import ScheduledRequest

PADDING_SLOT = -1
PADDING_TOKEN_ID = 0

# Rows of the packed buffers: one copy per buffer instead of one per field.
INPUT_IDS, POSITIONS, SLOT_MAPPING = range(3)
# PENDING_TOKENS / PENDING_SOURCES: for input tokens still on the device (async scheduling), the
# token's row in input_ids and its row in the previous step's sampled ids.
SEQ_LENS, QUERY_START_LOC, SAMPLE_ROWS, PENDING_TOKENS, PENDING_SOURCES = range(5)


@dataclass
class PreparedStep:
    input_ids: torch.Tensor  # [T_padded] int64, a view of a persistent buffer
    positions: torch.Tensor  # [T_padded] int64 ([3, T_padded] for M-RoPE models)
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] int32: rows of the hidden states that sample, in step order
    num_tokens: int  # T before padding
    num_requests: int  # B before padding
    max_blocks: int  # the most KV blocks one of the step's requests holds
    num_pending: int  # input tokens to take from the previous step's sampled ids (fill_pending)


class StepInputs:
    def __init__(
        self,
        max_num_tokens: int,
        max_num_requests: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        mrope: bool = False,
    ):
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"
        # [3, T]: input_ids, positions, slot_mapping. [5, B + 1]: seq_lens, query_start_loc,
        # sample_rows, pending tokens and their sources.
        self.host_tokens = torch.zeros(3, max_num_tokens, dtype=torch.int64, pin_memory=pin)
        self.host_requests = torch.zeros(5, max_num_requests + 1, dtype=torch.int32, pin_memory=pin)
        self.host_block_tables = torch.zeros(max_num_requests, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        if device.type == "cpu":
            self.tokens, self.requests, self.block_tables = self.host_tokens, self.host_requests, self.host_block_tables
        else:
            self.tokens = torch.zeros_like(self.host_tokens, device=device)
            self.requests = torch.zeros_like(self.host_requests, device=device)
            self.block_tables = torch.zeros_like(self.host_block_tables, device=device)
        self._tokens_np = self.host_tokens.numpy()
        self._requests_np = self.host_requests.numpy()
        self._tables_np = self.host_block_tables.numpy()
        # What each host table row holds: the block_ids list written there and how much of
        # it. A request keeps its row while the batch keeps its order, so most steps write
        # only the blocks a request gained, not every request's whole list.
        self._row_blocks: list[list[int] | None] = [None] * max_num_requests
        self._row_lengths = [0] * max_num_requests
        self.host_mrope = torch.zeros(max_num_tokens if mrope else 0, NUM_MROPE_ROWS, dtype=torch.int64, pin_memory=pin)
        self.mrope = self.host_mrope if device.type == "cpu" else torch.zeros_like(self.host_mrope, device=device)
        self._mrope_np = self.host_mrope.numpy() if mrope else None
        self._copied = torch.cuda.Event() if pin else None

    def prepare(
        self, scheduled: list[ScheduledRequest], dispatch: GraphDispatch, pending_rows: dict[Request, int] | None = None
    ) -> PreparedStep:
        """``pending_rows``: under async scheduling, each request's row in the sampled ids of the
        step still in flight; a request whose last input token the host has not seen takes it
        from there (``fill_pending``)."""
        self.wait_for_copies()
        num_requests = len(scheduled)
        num_new = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, num_requests)
        computed = np.fromiter((s.request.num_computed_tokens for s in scheduled), np.int64, num_requests)
        ids, positions, slots = self._tokens_np
        seq_lens, query_start_loc, sample_rows, pending_tokens, pending_sources = self._requests_np
        query_start_loc[0] = 0
        np.cumsum(num_new, out=query_start_loc[1 : num_requests + 1])
        num_tokens = int(query_start_loc[num_requests])
        seq_lens[:num_requests] = computed + num_new
        max_blocks = 0
        num_samples = 0
        num_pending = 0
        for row, entry in enumerate(scheduled):
            request = entry.request
            start = int(computed[row])
            if start + entry.num_new_tokens > len(request.all_token_ids):
                # Its last token was sampled by the step in flight: a placeholder the device overwrites.
                last = int(query_start_loc[row + 1]) - 1
                known = request.all_token_ids[start:]
                ids[last - len(known) : last] = known
                ids[last] = PADDING_TOKEN_ID
                pending_tokens[num_pending], pending_sources[num_pending] = last, pending_rows[request]
                num_pending += 1
            elif entry.num_new_tokens == 1:  # a decode: one id, no list slice to convert
                ids[query_start_loc[row]] = request.all_token_ids[start]
            else:
                ids[query_start_loc[row] : query_start_loc[row + 1]] = request.all_token_ids[start : start + entry.num_new_tokens]
            max_blocks = max(max_blocks, self._write_block_row(row, request.block_ids))
            if entry.samples:
                sample_rows[num_samples] = query_start_loc[row + 1] - 1
                num_samples += 1
        owner = np.repeat(np.arange(num_requests), num_new)  # [T]: request of each token
        positions[:num_tokens] = np.arange(num_tokens) - query_start_loc[owner] + computed[owner]
        token_positions = positions[:num_tokens]
        slots[:num_tokens] = (
            self._tables_np[owner, token_positions // self.block_size] * self.block_size
            + token_positions % self.block_size
        )
        padded_tokens, padded_requests = dispatch.num_tokens, dispatch.num_requests
        ids[num_tokens:padded_tokens] = PADDING_TOKEN_ID
        positions[num_tokens:padded_tokens] = 0
        if self._mrope_np is not None:
            self._fill_mrope(scheduled, computed, query_start_loc, padded_tokens)
        slots[num_tokens:padded_tokens] = PADDING_SLOT
        # Empty requests of a padded decode-only step: one token each, nothing to attend to.
        seq_lens[num_requests:padded_requests] = 0
        query_start_loc[num_requests + 1 : padded_requests + 1] = np.arange(
            num_tokens + 1, num_tokens + 1 + padded_requests - num_requests
        )
        self._copy(padded_tokens, padded_requests, num_requests, max_blocks)
        return self._prepared(padded_tokens, padded_requests, num_samples, num_tokens, num_requests, max_blocks, num_pending)

    def fill_pending(self, prepared: PreparedStep, sampled_ids: torch.Tensor) -> None:
        """Write the step's pending input tokens from ``sampled_ids`` (the previous step's, on the
        device) into its input ids, on the device's queue: the host never waits for them.
        Callers skip steps without pending tokens (there may be no previous step then)."""
        count = prepared.num_pending
        tokens = self.requests[PENDING_TOKENS, :count]
        sources = self.requests[PENDING_SOURCES, :count]
        prepared.input_ids.index_put_((tokens,), sampled_ids[sources])

    def _write_block_row(self, row: int, blocks: list[int]) -> int:
        """Bring host table row ``row`` up to ``blocks``; returns its length. A request's
        list only grows, or is replaced by a new list (kv_cache), so the same list at
        least as long as last time needs only its new tail."""
        length, written = len(blocks), self._row_lengths[row]
        if self._row_blocks[row] is not blocks or length < written:
            self._row_blocks[row], written = blocks, 0
        if length > written:
            self._tables_np[row, written:length] = blocks[written:]
        self._row_lengths[row] = length
        return length

    def host_sample_rows(self, num_samples: int) -> list[int]:
        return self._requests_np[SAMPLE_ROWS, :num_samples].tolist()

    def wait_for_copies(self) -> None:
        """The host buffers are reused every step: wait for the last copy out of them."""
        if self._copied is not None:
            self._copied.synchronize()

    def adopt_host_step(
        self, padded_tokens: int, padded_requests: int, num_requests: int, max_blocks: int, num_samples: int,
        num_tokens: int, num_pending: int,
    ) -> PreparedStep:
        """A step whose host arrays another rank wrote (tensor parallelism): copy them to this
        rank's device buffers and describe it."""
        self._copy(padded_tokens, padded_requests, num_requests, max_blocks)
        return self._prepared(padded_tokens, padded_requests, num_samples, num_tokens, num_requests, max_blocks, num_pending)

    def _fill_mrope(
        self, scheduled: list[ScheduledRequest], computed: np.ndarray, query_start_loc: np.ndarray, padded_tokens: int
    ) -> None:
        mrope = self._mrope_np  # [T, 3]
        mrope[:padded_tokens] = self._tokens_np[POSITIONS, :padded_tokens, None]
        for row, entry in enumerate(scheduled):
            prompt = entry.request.multimodal
            if prompt is None:
                continue  # text only: every row is the index
            start, first = int(computed[row]), int(query_start_loc[row])
            end = start + entry.num_new_tokens
            from_prompt = max(min(end, len(prompt.token_ids)) - start, 0)
            mrope[first : first + from_prompt] = prompt.mrope_positions[:, start : start + from_prompt].T
            mrope[first + from_prompt : first + entry.num_new_tokens] += prompt.mrope_delta

    def _prepared(
        self, padded_tokens: int, padded_requests: int, num_samples: int, num_tokens: int, num_requests: int,
        max_blocks: int, num_pending: int = 0,
    ) -> PreparedStep:
        seq_lens, query_start_loc = self._requests_np[SEQ_LENS], self._requests_np[QUERY_START_LOC]
        metadata = AttentionMetadata(
            slot_mapping=self.tokens[SLOT_MAPPING, :padded_tokens],
            # Full width, whatever the step's longest context: the decode kernel's split
            # count follows the width, and must not change between capture and replay.
            block_tables=self.block_tables[:padded_requests],
            seq_lens=self.requests[SEQ_LENS, :padded_requests],
            query_start_loc=self.requests[QUERY_START_LOC, : padded_requests + 1],
            seq_lens_cpu=seq_lens[:padded_requests].tolist(),
            query_start_loc_cpu=query_start_loc[: padded_requests + 1].tolist(),
        )
        return PreparedStep(
            input_ids=self.tokens[INPUT_IDS, :padded_tokens],
            positions=self.tokens[POSITIONS, :padded_tokens] if self._mrope_np is None else self.mrope[:padded_tokens].t(),
            metadata=metadata,
            sample_rows=self.requests[SAMPLE_ROWS, :num_samples],
            num_tokens=num_tokens,
            num_requests=num_requests,
            max_blocks=max_blocks,
            num_pending=num_pending,
        )

    def prepare_idle(self, num_requests: int, tokens_per_request: int = 1) -> PreparedStep:
        """A step of empty requests that writes no KV and attends to nothing: decode-only
        (one token each) for capturing graphs; with more tokens each, shaped like a step of
        prompt chunks (for warming up the kernels such steps run)."""
        self.wait_for_copies()
        num_tokens = num_requests * tokens_per_request
        ids, positions, slots = self._tokens_np
        seq_lens, query_start_loc = self._requests_np[SEQ_LENS], self._requests_np[QUERY_START_LOC]
        ids[:num_tokens], positions[:num_tokens], slots[:num_tokens] = PADDING_TOKEN_ID, 0, PADDING_SLOT
        if self._mrope_np is not None:
            self._mrope_np[:num_tokens] = 0
        seq_lens[:num_requests] = 0
        query_start_loc[: num_requests + 1] = np.arange(num_requests + 1) * tokens_per_request
        self._copy(num_tokens, num_requests, 0, 0)
        return self._prepared(num_tokens, num_requests, 0, num_tokens, num_requests, 0)

    def _copy(self, num_tokens: int, num_requests: int, num_real_requests: int, max_blocks: int) -> None:
        if self.device.type == "cpu":
            return
        self.tokens[:, :num_tokens].copy_(self.host_tokens[:, :num_tokens], non_blocking=True)
        if self._mrope_np is not None:
            self.mrope[:num_tokens].copy_(self.host_mrope[:num_tokens], non_blocking=True)
        self.requests[:, : num_requests + 1].copy_(self.host_requests[:, : num_requests + 1], non_blocking=True)
        # Only the blocks in use: columns past a request's blocks are never read.
        self.block_tables[:num_real_requests, :max_blocks].copy_(
            self.host_block_tables[:num_real_requests, :max_blocks], non_blocking=True
        )
        self._copied.record()
