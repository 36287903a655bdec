"""``LLMEngine`` where vLLM scripts import it from."""

from fxllm.runtime.engine import LLMEngine

__all__ = ["LLMEngine"]
