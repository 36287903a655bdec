"""Executors: what runs the model for the engine (see base.py)."""

from fxllm.config import EngineConfig
from fxllm.runtime.executor.base import Executor
from fxllm.runtime.executor.local import LocalExecutor


def make_executor(config: EngineConfig) -> Executor:
    """One process for one device; worker processes for tensor parallelism."""
    if config.parallel.tensor_parallel_size > 1:
        from fxllm.runtime.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    return LocalExecutor(config)


__all__ = ["Executor", "LocalExecutor", "make_executor"]
