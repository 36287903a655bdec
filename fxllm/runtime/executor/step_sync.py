"""Rank 0 tells the other ranks what each step runs: the step's host buffers, sent down pipes.

Rank 0 schedules and builds the step's inputs (``StepInputs``); the other ranks
receive the same host arrays as one message (a header, then the arrays packed as
bytes) on the pipe rank 0 holds to each of them, copy them into their own
persistent buffers and run the same forward. The header says what follows: a step,
a remote call of a runner method (``collective_rpc``), or the stop that ends a
worker's loop.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fxllm.config import CUDAGraphMode
from fxllm.forward_context import GraphDispatch
from fxllm.runtime.executor.workers import WorkerLinks
from fxllm.runtime.step_inputs import PreparedStep, StepInputs

_MODES = (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL)
STEP, STOP, CALL = 0, 1, 2
HEADER_FIELDS = 10  # command, mode, padded tokens/requests, tokens, requests, samples, blocks, logit rows, pending
HEADER_BYTES = HEADER_FIELDS * np.dtype(np.int64).itemsize


@dataclass
class ReceivedStep:
    prepared: PreparedStep
    dispatch: GraphDispatch
    logit_rows: torch.Tensor  # [R] rows whose logits rank 0 needs (every rank joins the gather)


@dataclass
class RemoteCall:
    """A runner method (by name) or a function of the runner, to run on every rank."""

    method: Any  # str: a ModelRunner method; else a callable taking the runner first
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class StepSync:
    def __init__(self, inputs: StepInputs, links: WorkerLinks):
        self.inputs = inputs
        self.links = links

    def send(self, prepared: PreparedStep, dispatch: GraphDispatch, logit_rows: torch.Tensor) -> None:
        """Rank 0, after ``inputs.prepare``: the arrays of the step it just prepared."""
        header = [
            STEP, _MODES.index(dispatch.mode), dispatch.num_tokens, dispatch.num_requests, prepared.num_tokens,
            prepared.num_requests, prepared.sample_rows.numel(), prepared.max_blocks, logit_rows.numel(),
            prepared.num_pending,
        ]
        tables = self.inputs.host_block_tables[: prepared.num_requests, : prepared.max_blocks]
        parts = _packing_order([*self._payload(dispatch.num_tokens, dispatch.num_requests), tables, logit_rows.cpu()])
        self.links.send(b"".join([_header(*header), *(part.contiguous().numpy().tobytes() for part in parts)]))

    def share_sampled(self, token_ids: torch.Tensor) -> None:
        """Rank 0 under async scheduling: the step's sampled ids, which the next step's pending
        input tokens come from, to every rank's device (a broadcast queued after the sampling)."""
        dist.broadcast(token_ids, src=0)

    def receive_sampled(self, count: int) -> torch.Tensor:
        """Other ranks: the ``count`` ids rank 0 sampled this step (``share_sampled``)."""
        token_ids = torch.empty(count, dtype=torch.int64, device=self.inputs.device)
        dist.broadcast(token_ids, src=0)
        return token_ids

    def send_stop(self) -> None:
        self.links.send(_header(STOP))

    def send_call(self, call: RemoteCall) -> None:
        """Every worker runs ``call`` on its runner and replies with the result (or its error)."""
        self.links.send(_header(CALL) + pickle.dumps(call))

    def receive(self) -> ReceivedStep | RemoteCall | None:
        """Other ranks: the next step, in this rank's buffers, or a remote call; None when rank 0 stops."""
        message = self.links.receive()
        if message is None:  # rank 0's process is gone
            return None
        header = np.frombuffer(message, dtype=np.int64, count=HEADER_FIELDS)
        command, mode, padded_tokens, padded_requests, num_tokens, num_requests, num_samples, max_blocks, rows, pending = (
            header.tolist()
        )
        if command == STOP:
            return None
        if command == CALL:
            return pickle.loads(message[HEADER_BYTES:])
        self.inputs.wait_for_copies()  # the host buffers are about to be overwritten
        tables = self.inputs.host_block_tables[:num_requests, :max_blocks]
        logit_rows = torch.empty(rows, dtype=torch.int64)
        parts = _packing_order([*self._payload(padded_tokens, padded_requests), tables, logit_rows])
        offset = HEADER_BYTES
        for part in parts:  # into this rank's host buffers
            array = part.numpy()
            array[...] = np.frombuffer(message, dtype=array.dtype, count=array.size, offset=offset).reshape(array.shape)
            offset += array.nbytes
        prepared = self.inputs.adopt_host_step(
            padded_tokens, padded_requests, num_requests, max_blocks, num_samples, num_tokens, pending
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


def _header(command: int, *fields: int) -> bytes:
    header = np.zeros(HEADER_FIELDS, dtype=np.int64)
    header[0] = command
    header[1 : 1 + len(fields)] = fields
    return header.tobytes()
