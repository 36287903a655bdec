"""vLLM's logits processor types, under the names vLLM scripts import
(``vllm.v1.sample.logits_processor`` -> ``fxllm.v1.sample.logits_processor``)."""

from __future__ import annotations

import functools
import inspect
from abc import abstractmethod
from typing import Any, Callable

import torch

from fxllm.sampling_params import SamplingParams
from fxllm.v1.sample.logits_processor.builtin import process_dict_updates
from fxllm.v1.sample.logits_processor.interface import (
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    MovedRequest,
    MoveDirectionality,
    RemovedRequest,
)

# A per-request processor: (output_ids, logits_row) -> logits_row, or
# (prompt_ids, output_ids, logits_row) -> logits_row.
RequestLogitsProcessor = Callable[..., torch.Tensor]


class AdapterLogitsProcessor(LogitsProcessor):
    """A batch-level processor made of per-request ones: ``new_req_logits_processor`` gives
    each request's (or None), applied to the request's row every step. Subclasses that
    override ``__init__`` call this one."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # Batch index -> the request's processor with its token lists bound (the lists are the
        # request's own: they grow as it generates).
        self.req_info: dict[int, functools.partial] = {}

    @abstractmethod
    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        """The processor for a request with these params; None where it does not apply."""

    def _new_state(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> functools.partial | None:
        processor = self.new_req_logits_processor(params)
        if processor is None:
            return None
        if len(inspect.signature(processor).parameters) == 3:
            if prompt_ids is None:
                raise ValueError(f"{type(self).__name__}: its request processor takes prompt ids, which this request lacks")
            return functools.partial(processor, prompt_ids, output_ids)
        return functools.partial(processor, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.req_info, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, processor in self.req_info.items():
            row = logits[index]
            processed = processor(row)
            if processed is not row:
                logits[index] = processed
        return logits


__all__ = [
    "AdapterLogitsProcessor",
    "AddedRequest",
    "BatchUpdate",
    "LogitsProcessor",
    "MovedRequest",
    "MoveDirectionality",
    "RemovedRequest",
    "RequestLogitsProcessor",
    "process_dict_updates",
]
