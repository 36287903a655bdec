"""Rank 0 tells the other ranks what each step runs: the step's host buffers, broadcast.

Rank 0 schedules and builds the step's inputs (``StepInputs``); the other ranks
receive the same host arrays over a gloo group (CPU tensors, whatever the device),
copy them into their own persistent buffers and run the same forward. A header
says what follows; a stop header ends a worker's loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fxllm.compiler.cudagraph import GraphDispatch
from fxllm.config import CUDAGraphMode
from fxllm.runtime.step_inputs import PreparedStep, StepInputs

_MODES = (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL)
STEP, STOP, SAVE = 0, 1, 2
HEADER_FIELDS = 9  # command, mode, padded tokens/requests, tokens, requests, samples, blocks, logit rows


@dataclass
class ReceivedStep:
    prepared: PreparedStep
    dispatch: GraphDispatch
    logit_rows: torch.Tensor  # [R] rows whose logits rank 0 needs (every rank joins the gather)


@dataclass
class SaveRequest:
    path: str


class StepSync:
    def __init__(self, inputs: StepInputs, group: dist.ProcessGroup):
        self.inputs = inputs
        # The workers' gloo host group, whatever the device: host arrays need no device sync.
        self.group = group

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0, group=self.group)

    def send(self, prepared: PreparedStep, dispatch: GraphDispatch, logit_rows: torch.Tensor) -> None:
        """Rank 0, after ``inputs.prepare``: the arrays of the step it just prepared, packed into
        one byte buffer after the header (two broadcasts a step: each costs a round trip)."""
        header = torch.tensor([
            STEP, _MODES.index(dispatch.mode), dispatch.num_tokens, dispatch.num_requests, prepared.num_tokens,
            prepared.num_requests, prepared.sample_rows.numel(), prepared.max_blocks, logit_rows.numel(),
        ])
        self._broadcast(header)
        tables = self.inputs.host_block_tables[: prepared.num_requests, : prepared.max_blocks]
        parts = _packing_order([*self._payload(dispatch.num_tokens, dispatch.num_requests), tables, logit_rows.cpu()])
        self._broadcast(torch.cat([part.contiguous().view(torch.uint8).reshape(-1) for part in parts]))

    def send_stop(self) -> None:
        self._send_command(STOP)

    def send_save(self, path: str) -> None:
        """Every rank writes its weights under ``path`` (save_sharded_state)."""
        self._send_command(SAVE)
        dist.broadcast_object_list([path], src=0, group=self.group)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def _send_command(self, command: int) -> None:
        header = torch.zeros(HEADER_FIELDS, dtype=torch.int64)
        header[0] = command
        self._broadcast(header)

    def receive(self) -> ReceivedStep | SaveRequest | None:
        """Other ranks: the next step, in this rank's buffers, or a save request; None when rank 0 stops."""
        header = torch.zeros(HEADER_FIELDS, dtype=torch.int64)
        self._broadcast(header)
        command, mode, padded_tokens, padded_requests, num_tokens, num_requests, num_samples, max_blocks, rows = (
            header.tolist()
        )
        if command == STOP:
            return None
        if command == SAVE:
            path = [None]
            dist.broadcast_object_list(path, src=0, group=self.group)
            return SaveRequest(path[0])
        self.inputs.wait_for_copies()  # the host buffers are about to be overwritten
        tables = self.inputs.host_block_tables[:num_requests, :max_blocks]
        logit_rows = torch.empty(rows, dtype=torch.int64)
        parts = _packing_order([*self._payload(padded_tokens, padded_requests), tables, logit_rows])
        packed = torch.empty(sum(part.numel() * part.element_size() for part in parts), dtype=torch.uint8)
        self._broadcast(packed)
        offset = 0
        for part in parts:  # into this rank's host buffers
            size = part.numel() * part.element_size()
            part.copy_(packed[offset : offset + size].view(part.dtype).view(part.shape))
            offset += size
        prepared = self.inputs.adopt_host_step(
            padded_tokens, padded_requests, num_requests, max_blocks, num_samples, num_tokens
        )
        dispatch = GraphDispatch(_MODES[mode], padded_tokens, padded_requests)
        return ReceivedStep(prepared, dispatch, logit_rows.to(self.inputs.device))

    def _payload(self, padded_tokens: int, padded_requests: int) -> list[torch.Tensor]:
        """The host-buffer rows a step fills."""
        inputs = self.inputs
        views = [row[:padded_tokens] for row in inputs.host_tokens]
        views += [row[: padded_requests + 1] for row in inputs.host_requests]
        if inputs.host_mrope.numel():
            views.append(inputs.host_mrope[:padded_tokens])
        return views


def _packing_order(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Widest elements first, so every part starts aligned for its dtype in the packed bytes."""
    return sorted(parts, key=lambda part: -part.element_size())
