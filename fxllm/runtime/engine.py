"""The engine loop: schedule, run, append tokens, finish requests."""

from __future__ import annotations

import logging
from typing import Any

from fxllm.config import EngineConfig
from fxllm.outputs import Logprob
from fxllm.parallel.workers import WorkerLinks
from fxllm.runtime.kv_cache import KVCacheManager, cdiv
from fxllm.runtime.request import Request
from fxllm.runtime.runner import ModelRunner
from fxllm.runtime.step_result import LaunchedStep, TokenLogprobs
from fxllm.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any, links: WorkerLinks | None = None):
        self.config = config
        self.tokenizer = tokenizer  # decodes the tokens of logprob entries
        self.runner = ModelRunner(config, links=links)
        num_blocks = self.runner.agree_num_blocks(self.runner.determine_num_blocks())
        block_size = config.cache.block_size
        max_model_len = config.model.max_model_len
        needed = cdiv(max_model_len, block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks ({num_blocks * block_size} tokens) but one request "
                f"of max_model_len={max_model_len} needs {needed}: lower max_model_len, or give the cache "
                f"more memory (gpu_memory_utilization on GPU, FXLLM_CPU_KVCACHE_SPACE on CPU, or "
                f"num_gpu_blocks_override)"
            )
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_cudagraphs()
        self.runner.warm_up()
        self.kv_cache = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not yet taken (async scheduling)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB) on %s",
            num_blocks, block_size, num_blocks * self.runner.bytes_per_block() / 2**30, config.device,
        )

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[Request]:
        """Run one step; return the requests that finished in it.

        Under async scheduling the step is launched before the previous one's tokens reach the
        host: the host's work for the two (scheduling, inputs, bookkeeping) overlaps the
        device's. A request that finishes on a token still in flight may already have a step
        launched for it; that step's token is dropped."""
        finished = []
        in_flight = self._in_flight
        if in_flight is not None and in_flight.needs_outputs:
            finished += self._complete(in_flight)
            in_flight = self._in_flight = None
        step = self.scheduler.schedule()
        launched = None
        if step.scheduled:
            launched = self.runner.launch(step, in_flight)
            for scheduled in step.scheduled:
                scheduled.request.num_computed_tokens += scheduled.num_new_tokens
                scheduled.request.num_pending_outputs += scheduled.samples
        if in_flight is not None:
            finished += self._complete(in_flight)
        self._in_flight = launched
        if launched is not None and not self.async_scheduling:
            finished += self._complete(launched)
            self._in_flight = None
        return finished

    def _complete(self, launched: LaunchedStep) -> list[Request]:
        """Take a launched step's tokens: append them, record logprobs, finish requests."""
        result = launched.result()
        sampled = iter(zip(result.sampled, result.logprobs))
        finished = []
        for scheduled in launched.step.scheduled:
            request = scheduled.request
            if scheduled.samples:
                token_id, logprobs = next(sampled)
                request.num_pending_outputs -= 1
            if request.finished:
                continue  # finished on a token of the step before: this step's token is dropped
            self.kv_cache.commit_full_blocks(request)
            for position in result.prompt_logprobs.get(request, ()):
                request.prompt_logprobs.append(self._logprob_dict(position, request))
            if scheduled.samples:
                request.append_output(token_id, self._logprob_dict(logprobs, request) if logprobs else None)
                if request.finish_reason is not None:
                    self.scheduler.finish(request)
                    # Its text now, inside the step: under async scheduling the device is
                    # running the next step meanwhile, so the decode costs no wall time.
                    _ = request.text
                    finished.append(request)
        return finished

    def _logprob_dict(self, position: TokenLogprobs, request: Request) -> dict[int, Logprob]:
        decode = request.detokenizer is not None
        return {
            token_id: Logprob(logprob, rank, self.tokenizer.decode([token_id]) if decode else None)
            for token_id, logprob, rank in zip(position.token_ids, position.logprobs, position.ranks)
        }

    def abort(self, requests: list[Request]) -> None:
        """Drop unfinished requests and free their blocks (e.g. after an interrupt)."""
        self._in_flight = None  # its tokens are dropped; later steps queue behind its device work
        for request in requests:
            if not request.finished:
                self.scheduler.finish(request)
