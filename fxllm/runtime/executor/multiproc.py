"""The tensor-parallel executor: this process is rank 0, forked or spawned workers the rest.

Rank 0 schedules and samples; every other rank builds the same runner on its shard,
agrees on the KV-cache size, captures the same CUDA graphs, then runs each step rank 0
sends (``step_sync``) until told to stop. Remote calls (``collective_rpc``) go down the
same pipes, so they arrive between steps. The executor owns the workers: their start,
their errors (raised in rank 0 with the worker's rank and traceback) and their shutdown,
which also runs when the executor is collected.
"""

from __future__ import annotations

import traceback
import weakref
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from fxllm.config import CompilationLevel, EngineConfig
from fxllm.models.loader import model_tp_layout
from fxllm.parallel.collectives import stop_one_shot_all_reduce, use_one_shot_all_reduce
from fxllm.parallel.plans import plan_for
from fxllm.runtime.executor.base import Executor, RemoteMethod, call_on_runner
from fxllm.runtime.executor.interrupts import interrupts_deferred
from fxllm.runtime.executor.step_sync import RemoteCall, StepSync
from fxllm.runtime.executor.workers import WorkerGone, WorkerGroup, WorkerLinks
from fxllm.runtime.runner import ModelRunner
from fxllm.runtime.scheduler import SchedulerOutput
from fxllm.runtime.step_observer import StepPhases
from fxllm.runtime.step_result import LaunchedStep


def check_tensor_parallel_support(config: EngineConfig) -> None:
    """Everything that would stop a tensor-parallel engine, checked before any worker starts."""
    size = config.parallel.tensor_parallel_size
    model_config = config.model
    plan_for(model_config.architecture)  # a clear error for an architecture without a plan
    if model_config.runner_type == "pooling" or model_config.multimodal is not None:
        raise ValueError(
            f"tensor_parallel_size={size} is not supported yet for pooling or vision-language models; "
            f"use tensor_parallel_size=1"
        )
    if config.compilation.level == CompilationLevel.DYNAMO_AS_IS:
        raise ValueError(
            "tensor parallelism inserts its collectives into the captured graph, which compilation level 1 "
            "does not have: use level 0, 2 or 3"
        )
    if config.device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} GPUs but {torch.cuda.device_count()} are visible; "
            f"set CUDA_VISIBLE_DEVICES or lower tensor_parallel_size"
        )
    # Heads, KV heads and MLP width must split over the ranks: a clear error here, not in a worker.
    model_tp_layout(model_config.hf_config, 0, size)


class HostGroupSync:
    """The ranks meet over the gloo host group during start-up (see runner.RankSync)."""

    def __init__(self, host_group: dist.ProcessGroup):
        self.host_group = host_group

    def barrier(self) -> None:
        dist.barrier(group=self.host_group)

    def min(self, value: int) -> int:
        fewest = torch.tensor([value])
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN, group=self.host_group)
        return int(fewest.item())


def start_rank(
    config: EngineConfig, rank: int, links: WorkerLinks, phases: StepPhases | None = None
) -> tuple[ModelRunner, int]:
    """One rank's start-up, the same on every rank: the one-shot all-reduce (on GPUs, before
    any collective runs), then the runner. Returns the runner and the agreed KV blocks."""
    one_shot_bytes = 0
    if config.device.type == "cuda" and not config.parallel.disable_custom_all_reduce:
        one_shot_bytes = use_one_shot_all_reduce(links.host_group, config.model.dtype, config.device)
    runner = ModelRunner(config, rank, phases)
    num_blocks = runner.start(HostGroupSync(links.host_group))
    runner.compile_report.one_shot_all_reduce_bytes = one_shot_bytes
    return runner, num_blocks


def run_worker(rank: int, world_size: int, links: WorkerLinks, config: EngineConfig) -> None:
    """A worker's life: start its rank, then run what rank 0 sends until it says stop."""
    if config.device.type == "cuda":
        torch.cuda.set_device(rank)
        config = replace(config, device=torch.device("cuda", rank))
    runner, _ = start_rank(config, rank, links)
    step_sync = StepSync(runner.inputs, links)
    async_scheduling = config.scheduler.async_scheduling
    shared_sampled = None  # rank 0's sampled ids of the last step (async scheduling)
    with torch.inference_mode():  # the step buffers are inference tensors
        while (message := step_sync.receive()) is not None:
            if isinstance(message, RemoteCall):
                links.reply(_run_call(runner, message))
                continue
            runner.execute_received(message, shared_sampled)
            num_samples = message.prepared.sample_rows.numel()
            if async_scheduling and num_samples:
                shared_sampled = step_sync.receive_sampled(num_samples)
    # Before the process group is destroyed.
    runner.release_cudagraphs()
    stop_one_shot_all_reduce()


def _run_call(runner: ModelRunner, call: RemoteCall) -> tuple[bool, Any]:
    """(True, result), or (False, the traceback): a failed call leaves the worker serving."""
    try:
        return True, call_on_runner(runner, call.method, call.args, call.kwargs)
    except Exception:
        return False, traceback.format_exc()


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, phases: StepPhases | None = None):
        check_tensor_parallel_support(config)
        size = config.parallel.tensor_parallel_size
        # Workers start first and build their shards while rank 0 (this process) builds its own.
        self._workers = WorkerGroup(size, config.device.type, run_worker, config, config.parallel.worker_multiproc_method)
        try:
            self.driver, self.num_blocks = self._raising_worker_errors(start_rank, config, 0, self._workers.links, phases)
        except BaseException:
            self._workers.shutdown()
            raise
        self._links = self._workers.links
        self._step_sync = StepSync(self.driver.inputs, self._links)
        self._async_scheduling = config.scheduler.async_scheduling
        # Set while a step or call is under way on the ranks: still set after one fails half-way.
        self._unfinished = False
        self._finalizer = weakref.finalize(self, _shut_down, self.driver, self._workers, self._step_sync)

    def execute_model(self, step: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        with interrupts_deferred():
            return self._raising_worker_errors(self._execute_model, step, previous)

    def _execute_model(self, step: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        driver = self.driver
        plan = driver.prepare(step, previous)
        self._unfinished = True
        # Sent before the pending tokens are filled in: every rank fills its own (on CPU the
        # host arrays are the device buffers, and would carry them otherwise).
        self._step_sync.send(plan.prepared, plan.dispatch, driver.worker_logit_rows(plan))
        launched = driver.execute(plan, previous)
        if self._async_scheduling and plan.sampling:
            self._step_sync.share_sampled(launched.token_ids)
        self._unfinished = False
        return launched

    @property
    def needs_restart(self) -> bool:
        return self._unfinished or any(code is not None for code in self._workers.exit_codes)

    def collective_rpc(
        self, method: RemoteMethod, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> list[Any]:
        with interrupts_deferred():
            return self._raising_worker_errors(self._collective_rpc, method, args, kwargs or {})

    def _collective_rpc(self, method: RemoteMethod, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        self._unfinished = True
        self._step_sync.send_call(RemoteCall(method, args, kwargs))
        try:
            own = call_on_runner(self.driver, method, args, kwargs)
        finally:
            replies = self._links.gather_replies()  # always: the workers answer either way
        self._unfinished = False
        results = [own]
        for rank, (ok, value) in enumerate(replies, start=1):
            if not ok:
                raise RuntimeError(f"collective_rpc({method!r}) failed on tensor-parallel worker rank {rank}:\n{value}")
            results.append(value)
        return results

    def _raising_worker_errors(self, function, *args: Any) -> Any:
        """Call ``function``; where a worker failed, raise its error (with its rank) instead."""
        try:
            return function(*args)
        except (Exception, WorkerGone) as error:
            self._workers.raise_worker_error(error)
            raise

    def shutdown(self) -> None:
        self._finalizer()

    @property
    def worker_pids(self) -> list[int]:
        return self._workers.pids


def _shut_down(driver: ModelRunner, workers: WorkerGroup, step_sync: StepSync) -> None:
    """Tell the workers to leave their loop, release rank 0's CUDA graphs (which hold its
    collectives) and one-shot all-reduce buffers, then destroy the process group and join
    the workers (``del llm`` and interpreter exit)."""
    try:
        step_sync.send_stop()
    except Exception:  # a worker already gone: shut down what is left
        pass
    driver.release_cudagraphs()
    stop_one_shot_all_reduce()
    workers.shutdown()
