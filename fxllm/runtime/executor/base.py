"""The executor: what runs the model for the engine, on one process or on several.

``LLMEngine`` owns one executor and talks to the model only through it: the executor
builds every rank's ``ModelRunner``, launches each scheduled step on all of them,
carries remote calls to every rank (``collective_rpc``), reports a worker's error with
its rank, and shuts everything down. ``LocalExecutor`` runs the one runner in this
process; ``MultiprocExecutor`` adds forked or spawned workers for tensor parallelism.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from fxllm.compiler import CompileReport
from fxllm.runtime.runner import ModelRunner
from fxllm.runtime.scheduler import SchedulerOutput
from fxllm.runtime.step_result import LaunchedStep

# A runner method's name, or a function called with the runner first.
RemoteMethod = str | Callable[..., Any]


class Executor(abc.ABC):
    """Runs steps on the engine's model; ``driver`` is the runner in this process (rank 0)."""

    driver: ModelRunner
    num_blocks: int

    @abc.abstractmethod
    def execute_model(self, step: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Launch ``step`` on every rank; the result holds rank 0's sampled tokens."""

    @abc.abstractmethod
    def collective_rpc(
        self, method: RemoteMethod, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> list[Any]:
        """Run ``method`` on every rank's runner; the results in rank order."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the ranks; the executor serves nothing afterwards. Safe to call twice."""

    @property
    def needs_restart(self) -> bool:
        """Whether the ranks may be out of step (a step failed half-way): the engine then starts
        a new executor before the next step."""
        return False

    @property
    def compile_report(self) -> CompileReport:
        return self.driver.compile_report

    @property
    def worker_pids(self) -> list[int]:
        """Processes of the ranks other than this one (none for a local executor)."""
        return []


def call_on_runner(runner: ModelRunner, method: RemoteMethod, args: tuple, kwargs: dict[str, Any] | None) -> Any:
    if isinstance(method, str):
        if method.startswith("_") or not callable(getattr(runner, method, None)):
            raise ValueError(f"collective_rpc: {method!r} is not a public ModelRunner method")
        return getattr(runner, method)(*args, **(kwargs or {}))
    if not callable(method):
        raise TypeError(f"collective_rpc takes a method name or a callable, got {type(method).__name__}")
    return method(runner, *args, **(kwargs or {}))
