"""vLLM's batch-level logits processor interface (``LLM(logits_processors=[...])``).

A processor sees the sampling rows of each step as one batch whose rows keep their
places from step to step (a persistent batch): ``update_state`` tells it, before each
step, which rows were added (a request and its sampling params), removed, or moved,
and ``apply`` then gets the step's logits, one row per request in that batch.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fxllm.sampling_params import SamplingParams


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = enum.auto()  # the request at the first index moves to the second
    SWAP = enum.auto()  # the requests at the two indices trade places


# The index a request left.
RemovedRequest = int
# (index, sampling params, prompt token ids, output token ids): the output list is the
# request's own, so it grows as the request generates.
AddedRequest = tuple[int, SamplingParams, "list[int] | None", "list[int]"]
# (from index, to index, how).
MovedRequest = tuple[int, int, MoveDirectionality]


@dataclass(frozen=True)
class BatchUpdate:
    """How the batch changed since the last step. Apply removed, then added, then moved; an
    added or moved request may take an index another request left."""

    batch_size: int
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    """A batch-level logits processor. Per-request settings come from
    ``SamplingParams.extra_args``; ``validate_params`` checks them when a request is submitted."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ValueError for sampling params this processor cannot serve."""

    @abstractmethod
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        """``vllm_config``: the engine's configuration (fxllm's ``EngineConfig``)."""

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The batch's logits [batch_size, vocab] processed; may modify and return ``logits``."""

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True when it never changes a row's argmax: it then applies to sampled rows only, after
        temperature (greedy rows never see it)."""

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called before each step's ``apply``; None when the batch did not change."""
