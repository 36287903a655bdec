"""The executor of a one-process engine: its runner is the whole model."""

from __future__ import annotations

from typing import Any

from fxllm.config import EngineConfig
from fxllm.runtime.executor.base import Executor, RemoteMethod, call_on_runner
from fxllm.runtime.runner import ModelRunner
from fxllm.runtime.scheduler import SchedulerOutput
from fxllm.runtime.step_observer import StepPhases
from fxllm.runtime.step_result import LaunchedStep


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig, phases: StepPhases | None = None):
        self.driver = ModelRunner(config, phases=phases)
        self.num_blocks = self.driver.start()

    def execute_model(self, step: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        return self.driver.execute(self.driver.prepare(step, previous), previous)

    def collective_rpc(
        self, method: RemoteMethod, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> list[Any]:
        return [call_on_runner(self.driver, method, args, kwargs)]

    def shutdown(self) -> None:
        pass
