"""fxllm: a compiler-first offline LLM inference engine with vLLM's offline API."""

from fxllm.llm import LLM
from fxllm.outputs import CompletionOutput, RequestOutput
from fxllm.sampling_params import SamplingParams


def default_model() -> str:
    """Local directory of the default model (SmolLM2-135M-Instruct), fetched on first use."""
    from fxllm.models.default_model import default_model as _default_model

    return _default_model()


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "default_model"]
