"""Token-budget scheduler: which requests compute how many tokens this step.

There are no prefill and decode phases: running requests are served first (a
decode is one token, a long prompt a chunk of it), then waiting ones, all within
``max_num_batched_tokens`` and ``max_num_seqs``. Under async scheduling a request
may have a token still on the device (``Request.num_pending_outputs``): its decode
is scheduled all the same, and the step takes that token from the device. When the
cache is full the newest running request is preempted: its blocks are freed and it
is re-queued to recompute (no swapping).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fxllm.config import SchedulerConfig
from fxllm.runtime.kv_cache import KVCacheManager
from fxllm.runtime.request import Request, RequestStatus

if TYPE_CHECKING:
    from fxllm.runtime.stats import EngineStats
    from fxllm.runtime.step_result import StepResult


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # Whether this step reaches the request's last token, so it samples a new one. Fixed
    # when scheduled (read several times a step, and after num_computed_tokens moves).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, stats: EngineStats | None = None):
        self.config = config
        self.kv_cache = kv_cache
        self.stats = stats
        self.by_priority = config.policy == "priority"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.stats.queued_ts = time.monotonic()
        self._queue(request)

    def _queue(self, request: Request) -> None:
        """FCFS: to the back. Priority: after every waiting request of lower or equal rank."""
        if not self.by_priority:
            self.waiting.append(request)
            return
        rank = (request.priority, request.arrival_index)
        index = len(self.waiting)
        while index > 0 and (self.waiting[index - 1].priority, self.waiting[index - 1].arrival_index) > rank:
            index -= 1
        self.waiting.insert(index, request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.output_complete_when_pending_arrive:
                index += 1  # it finishes when the launched step's tokens arrive
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, num_new, output):
                break  # the request preempted itself: nothing newer is left to schedule
            output.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            index += 1
        if output.preempted:
            return output  # the cache is full: admit nothing new this step
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting[0]
            num_new = self.kv_cache.allocate_new(request, budget)
            if num_new is None:
                break
            self.waiting.popleft()
            if not request.stats.scheduled_ts:
                request.stats.scheduled_ts = time.monotonic()
                request.num_cached_tokens = request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return output

    def on_launched(self, output: SchedulerOutput) -> None:
        """A step's device work is queued: its tokens count as computed, its samples as pending."""
        for scheduled in output.scheduled:
            scheduled.request.num_computed_tokens += scheduled.num_new_tokens
            scheduled.request.num_pending_outputs += scheduled.samples

    def on_result(self, output: SchedulerOutput, result: "StepResult") -> list[Request]:
        """A launched step's tokens reached the host: append them, record logprobs, offer full
        blocks to the prefix cache and finish requests; returns the requests it finished."""
        sampled = iter(zip(result.sampled, result.logprobs))
        finished = []
        now = time.monotonic()
        for scheduled in output.scheduled:
            request = scheduled.request
            if scheduled.samples:
                token_id, logprobs = next(sampled)
                request.num_pending_outputs -= 1
            if request.finished:
                continue  # finished on a token of the step before: this step's token is dropped
            self.kv_cache.commit_full_blocks(request)
            if request.prompt_logprobs is not None:
                request.prompt_logprobs.extend(result.prompt_logprobs.get(request, ()))
            if scheduled.samples:
                request.append_output(token_id, logprobs)
                self._record_token(request, now)
                if request.finish_reason is not None:
                    self.finish(request)
                    finished.append(request)
                    if self.stats is not None:
                        self.stats.on_finished(request, now)
        return finished

    def _record_token(self, request: Request, now: float) -> None:
        stats = request.stats
        stats.num_generation_tokens += 1
        if stats.num_generation_tokens == 1:
            stats.first_token_ts = now
            stats.first_token_latency = now - stats.queued_ts
        if self.stats is not None:
            self.stats.on_token(request, now)
        stats.last_token_ts = now

    def finish(self, request: Request) -> None:
        """Remove a finished (or aborted) request and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED

    def _make_room(self, request: Request, num_new: int, output: SchedulerOutput) -> bool:
        """Allocate for ``request``, preempting the newest running requests as needed."""
        while not self.kv_cache.allocate(request, num_new):
            victim = self._victim()
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _victim(self) -> Request:
        """The running request to preempt: the newest (FCFS), or the lowest in priority."""
        if not self.by_priority:
            return self.running.pop()
        victim = max(self.running, key=lambda r: (r.priority, r.arrival_index))
        self.running.remove(victim)
        return victim

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        if self.by_priority:
            self._queue(request)
        else:
            self.waiting.appendleft(request)
