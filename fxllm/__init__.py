"""fxllm: a compiler-first offline LLM inference engine with vLLM's offline API."""

from fxllm.config import CompilationConfig, CompilationLevel, CompilationMode, CUDAGraphMode, PoolerConfig
from fxllm.engine_args import EngineArgs
from fxllm.inputs import PromptType, TextPrompt, TokensPrompt
from fxllm.llm import LLM
from fxllm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from fxllm.runtime.engine import LLMEngine
from fxllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


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
    "LLMEngine",
    "EngineArgs",
    "SamplingParams",
    "BeamSearchParams",
    "RequestOutputKind",
    "PromptType",
    "TextPrompt",
    "TokensPrompt",
    "RequestOutput",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "PoolingOutput",
    "PoolingRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
    "CompilationConfig",
    "CompilationLevel",
    "CompilationMode",
    "CUDAGraphMode",
    "PoolerConfig",
    "default_model",
    "default_embedding_model",
]
