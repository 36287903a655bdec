"""Request outputs with vLLM's names: ``RequestOutput`` holding ``CompletionOutput``s, and
for pooling models ``PoolingRequestOutput`` (``EmbeddingRequestOutput``, ``ScoringRequestOutput``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fxllm.metrics import RequestStateStats


@dataclass
class Logprob:
    """A token's log probability (before temperature/top-k/top-p), its rank (1 = most
    likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" (EOS / stop token) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestStateStats | None = None  # the first completion's timeline
    lora_request: Any = None
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` are prompt + generated, ``text`` their decoded text (as vLLM)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class PoolingOutput:
    data: torch.Tensor  # the pooled vector, float32 on the host


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ScoringOutput:
    score: float  # cosine similarity of the two embeddings


_Output = TypeVar("_Output", PoolingOutput, EmbeddingOutput, ScoringOutput)


@dataclass
class PoolingRequestOutput(Generic[_Output]):
    """The result of one prompt of a pooling model (of one pair, for ``score``)."""

    request_id: str
    outputs: _Output
    prompt_token_ids: list[int]
    finished: bool = True


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    pass


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    pass
