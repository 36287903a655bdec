"""Watching the engine's steps: host time by phase, and each scheduled step as it ends.

Benchmarks and profilers attach a ``StepObserver`` to an engine
(``LLMEngine.add_step_observer``) instead of wrapping its methods. With no observer
attached, phases are not timed at all.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fxllm.runtime.scheduler import SchedulerOutput

# The phases of a step, in the order they run (async scheduling overlaps "wait for tokens"
# of one step with the device work of the next):
PHASES = (
    "step",  # the whole of LLMEngine.step
    "schedule",  # Scheduler.schedule
    "launch",  # the executor launching the step (the next three, and sending it to other ranks)
    "inputs",  # the step's input buffers, built on the host and copied
    "grammar masks",  # the structured-outputs token bitmasks, filled on the host and copied
    "sampling batch",  # sampling parameters as device tensors
    "device work",  # model, logits and sampler: on a GPU the time to queue them, on a CPU to run them
    "wait for tokens",  # until the sampled tokens reach the host
)


class StepObserver(Protocol):
    def on_phase(self, phase: str, seconds: float) -> None:
        """Host seconds spent in one of ``PHASES`` (called once per phase per step)."""

    def on_step_end(self, scheduled: "SchedulerOutput", seconds: float) -> None:
        """A step ended: what it scheduled (possibly nothing) and its wall seconds."""


class _Timed:
    __slots__ = ("observers", "phase", "start")

    def __init__(self, observers: list[StepObserver], phase: str):
        self.observers, self.phase = observers, phase

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.start
        for observer in self.observers:
            observer.on_phase(self.phase, seconds)


_UNTIMED = contextlib.nullcontext()


class StepPhases:
    """``with phases("schedule"): ...`` times the block for the attached observers, if any."""

    def __init__(self) -> None:
        self.observers: list[StepObserver] = []

    def __call__(self, phase: str) -> contextlib.AbstractContextManager:
        return _Timed(self.observers, phase) if self.observers else _UNTIMED
