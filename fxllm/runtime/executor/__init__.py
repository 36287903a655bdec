"""Executors: what runs the model for the engine (see base.py)."""

from fxllm.config import EngineConfig
from fxllm.runtime.executor.base import Executor
from fxllm.runtime.executor.local import LocalExecutor
from fxllm.runtime.step_observer import StepPhases


def make_executor(config: EngineConfig, phases: StepPhases | None = None) -> Executor:
    """One process for one device; worker processes for tensor parallelism. ``phases``: where
    this process's runner reports the host time of its phases."""
    if config.parallel.tensor_parallel_size > 1:
        from fxllm.runtime.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config, phases)
    return LocalExecutor(config, phases)


__all__ = ["Executor", "LocalExecutor", "make_executor"]
