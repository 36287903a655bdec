"""fxllm: a compiler-first offline LLM inference engine with vLLM's offline API."""

from fxllm.llm import LLM
from fxllm.outputs import (
    CompletionOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from fxllm.sampling_params import SamplingParams


def default_model() -> str:
    """Local directory of the default model (SmolLM2-135M-Instruct), fetched on first use."""
    from fxllm.models.default_model import default_model as _default_model

    return _default_model()


def default_embedding_model() -> str:
    """Local directory of the default embedding model (all-MiniLM-L6-v2), fetched on first use."""
    from fxllm.models.default_model import default_embedding_model as _default_embedding_model

    return _default_embedding_model()


__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "PoolingRequestOutput",
    "ScoringRequestOutput",
    "default_model",
    "default_embedding_model",
]
