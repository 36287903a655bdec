"""One request's state as it moves through the scheduler, cache and runner."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # max_tokens capped so prompt + output fit max_model_len
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) and the user's stop_token_ids
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None  # per-request, for seeded sampling
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks of all_token_ids
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.detokenizer.add(token_id)
        if token_id in self.stop_token_ids:
            self.finish_reason = "stop"
            user_stop = token_id in self.sampling_params.stop_token_ids
            self.stop_reason = token_id if user_stop else None
        elif len(self.output_token_ids) >= self.max_tokens:
            self.finish_reason = "length"
