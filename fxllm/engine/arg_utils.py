"""``EngineArgs`` where vLLM scripts import it from."""

from fxllm.engine_args import EngineArgs

__all__ = ["EngineArgs"]
