"""The engine loop: schedule, launch on the executor, take the tokens, finish requests."""

from __future__ import annotations

import itertools
import logging
import sys
import time
from typing import Any, Callable

from fxllm.compiler import CompileReport
from fxllm.config import EngineConfig
from fxllm.metrics import Metric
from fxllm.runtime.executor import Executor, make_executor
from fxllm.runtime.kv_cache import KVCacheManager
from fxllm.runtime.request import Request
from fxllm.runtime.runner import ModelRunner
from fxllm.runtime.scheduler import Scheduler, SchedulerOutput
from fxllm.runtime.stats import EngineStats
from fxllm.runtime.step_observer import StepObserver, StepPhases
from fxllm.runtime.step_result import LaunchedStep, StepResult

logger = logging.getLogger(__name__)

# What ``use_tqdm`` may be: a switch, or vLLM's callable that builds the progress bar.
UseTqdm = bool | Callable[..., Any]


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        self.phases = StepPhases()  # timed only while an observer is attached
        self.stats = EngineStats(config.model.model)
        self._start_executor()
        self._arrivals = itertools.count()
        self._profiler: Any = None
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not yet taken (async scheduling)
        self._last_scheduled = SchedulerOutput()  # what the last step scheduled, for observers

    def _start_executor(self) -> None:
        """The executor and the KV-cache bookkeeping of its blocks."""
        config = self.config
        self.executor: Executor = make_executor(config, self.phases)
        num_blocks, block_size = self.executor.num_blocks, config.cache.block_size
        self.kv_cache = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, self.stats)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB) on %s",
            num_blocks, block_size, num_blocks * self.runner.bytes_per_block() / 2**30, config.device,
        )

    def _restart_if_out_of_step(self) -> None:
        """After a step failed half-way under tensor parallelism the ranks may disagree on what
        runs next: start them afresh (the compile cache makes it quick) before the next call."""
        if not self.executor.needs_restart:
            return
        logger.warning("restarting the tensor-parallel workers: the last step failed before every rank finished it")
        self.executor.shutdown()
        self._start_executor()

    @property
    def runner(self) -> ModelRunner:
        """The runner in this process (rank 0): its model, caches and compile report."""
        return self.executor.driver

    @property
    def compile_report(self) -> CompileReport:
        return self.executor.compile_report

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def add_request(self, request: Request) -> None:
        request.arrival_index = next(self._arrivals)
        request.stats.arrival_time = time.time()
        self.scheduler.add(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def run(self, requests: list[Request], use_tqdm: UseTqdm = True) -> None:
        """Queue ``requests`` and step until every one has finished. On any exception (a Ctrl-C
        too), queued or running, they are dropped and their blocks freed: the engine serves the
        next call as if this one had never been made."""
        progress = None
        self._restart_if_out_of_step()
        try:
            for request in requests:
                self.add_request(request)
            progress = progress_bar(use_tqdm, len(requests))
            start = time.perf_counter()
            num_output_tokens = 0
            while self.has_unfinished():
                for request in self.step():
                    if progress is not None:
                        num_output_tokens += len(request.output_token_ids)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        progress.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} tok/s", refresh=False)
                        progress.update(1)
        except BaseException:
            self.abort(requests)
            raise
        finally:
            if progress is not None:
                progress.close()

    def add_step_observer(self, observer: StepObserver) -> None:
        """Report each step's phases and end to ``observer`` (see runtime/step_observer.py)."""
        self.phases.observers.append(observer)

    def remove_step_observer(self, observer: StepObserver) -> None:
        self.phases.observers.remove(observer)

    def step(self) -> list[Request]:
        """Run one step; return the requests that finished in it.

        Under async scheduling the step is launched before the previous one's tokens reach the
        host: the host's work for the two (scheduling, inputs, bookkeeping) overlaps the
        device's. A request that finishes on a token still in flight may already have a step
        launched for it; that step's token is dropped."""
        if self._profiler is not None:
            self._profiler.step()
        if not self.phases.observers:
            return self._step()
        start = time.perf_counter()
        with self.phases("step"):
            finished = self._step()
        for observer in self.phases.observers:
            observer.on_step_end(self._last_scheduled, time.perf_counter() - start)
        return finished

    def _step(self) -> list[Request]:
        finished = []
        in_flight = self._in_flight
        if in_flight is not None and in_flight.needs_outputs:
            finished += self._complete(in_flight)
            in_flight = self._in_flight = None
        with self.phases("schedule"):
            step = self._last_scheduled = self.scheduler.schedule()
        launched = None
        if step.scheduled:
            with self.phases("launch"):
                launched = self.executor.execute_model(step, in_flight)
            self.scheduler.on_launched(step)
        if in_flight is not None:
            finished += self._complete(in_flight)
        self._in_flight = launched
        if launched is not None and not self.async_scheduling:
            finished += self._complete(launched)
            self._in_flight = None
        return finished

    def _complete(self, launched: LaunchedStep) -> list[Request]:
        with self.phases("wait for tokens"):
            result: StepResult = launched.result()
        finished = self.scheduler.on_result(launched.step, result)
        for request in finished:
            # Its text now, inside the step: under async scheduling the device is running the
            # next step meanwhile, so the decode costs no wall time.
            _ = request.text
        return finished

    def abort(self, requests: list[Request]) -> None:
        """Drop unfinished requests and free their blocks (e.g. after an interrupt)."""
        self._in_flight = None  # its tokens are dropped; later steps queue behind its device work
        now = time.monotonic()
        for request in requests:
            if not request.finished:
                request.finish_reason = "abort"
                self.scheduler.finish(request)
                self.stats.on_finished(request, now)

    def get_metrics(self) -> list[Metric]:
        """vLLM's counters, gauges and histograms since the engine started."""
        scheduler, kv_cache = self.scheduler, self.kv_cache
        return self.stats.snapshot(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting), kv_usage=kv_cache.usage,
            preemptions=scheduler.num_preemptions, prefix_queries=kv_cache.prefix_queries,
            prefix_hits=kv_cache.prefix_hits,
        )

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's blocks; False while requests hold blocks (nothing is done then)."""
        return self.kv_cache.reset_prefix_cache()

    def start_profile(self, profile_prefix: str | None = None) -> None:
        """Profile the engine's steps with the torch profiler (``config.profiler``): the steps after
        ``delay_iterations``, until ``stop_profile()`` or ``max_iterations`` steps."""
        settings = self.config.profiler
        if self._profiler is not None:
            raise RuntimeError("the profiler is already running: call stop_profile() first")
        if not settings.torch_profiler_dir:
            raise ValueError(
                "start_profile() needs a directory: LLM(..., profiler_config={'profiler': 'torch', "
                "'torch_profiler_dir': '/path'}) or FXLLM_TORCH_PROFILER_DIR"
            )
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.config.device.type == "cuda" else [])
        directory = settings.torch_profiler_dir
        # Steps are the profiler's steps: wait out the delay, then record up to max_iterations.
        active = settings.max_iterations or 2**31 - 1
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=settings.delay_iterations, warmup=0, active=active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(directory, worker_name=profile_prefix),
            with_stack=settings.torch_profiler_with_stack,
            record_shapes=settings.torch_profiler_record_shapes,
            profile_memory=settings.torch_profiler_with_memory,
            with_flops=settings.torch_profiler_with_flops,
        )
        self._profiler.start()

    def stop_profile(self) -> None:
        """Stop the profiler and write its trace (a file for TensorBoard or Perfetto)."""
        if self._profiler is None:
            raise RuntimeError("the profiler is not running: call start_profile() first")
        profiler, self._profiler = self._profiler, None
        profiler.stop()

    def collective_rpc(self, method: Any, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Run a runner method (by name) or ``method(runner, *args)`` on every rank; results in rank order."""
        self._restart_if_out_of_step()
        return self.executor.collective_rpc(method, args, kwargs)

    def shutdown(self) -> None:
        self.executor.shutdown()


def progress_bar(use_tqdm: UseTqdm, total: int) -> Any:
    """A progress bar, or None: none asked for, or no terminal stream to draw on (pythonw, daemons)."""
    if not use_tqdm or sys.stderr is None:
        return None
    if callable(use_tqdm):
        return use_tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
