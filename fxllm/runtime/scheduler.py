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

from collections import deque
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from fxllm.config import SchedulerConfig
from fxllm.runtime.kv_cache import KVCacheManager
from fxllm.runtime.request import Request, RequestStatus

if TYPE_CHECKING:
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
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

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
                if request.finish_reason is not None:
                    self.finish(request)
                    finished.append(request)
        return finished

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
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)
