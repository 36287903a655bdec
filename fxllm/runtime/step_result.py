"""A launched step and its result on the host: sampled tokens, their logprobs, prompt logprobs.

The sampled ids stay on the device, where the next step takes its pending input
tokens from (async scheduling); a non-blocking copy brings them to the host, and
``LaunchedStep.result()`` waits for that copy alone, not for the device work queued
after it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch

from fxllm.runtime.logprobs import TokenLogprobs
from fxllm.runtime.request import Request
from fxllm.runtime.sampler import SamplerOutput
from fxllm.runtime.scheduler import SchedulerOutput


@dataclass
class StepResult:
    sampled: list[int] = field(default_factory=list)  # one token per sampling request, in step order
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per sampling request
    prompt_logprobs: dict[Request, list[TokenLogprobs]] = field(default_factory=dict)  # new positions only


class LaunchedStep:
    """A step whose device work is queued: its sampled ids stay on the device for the next step
    and are copied to the host without blocking; ``result()`` waits for that copy alone."""

    def __init__(self, step: SchedulerOutput, sampling: list[Request], reads_outputs: bool = False):
        self.step = step
        self.sampling = sampling  # the requests that sample, in row order
        self.reads_outputs = reads_outputs  # the engine's logits processors read every request's outputs
        self.token_ids: torch.Tensor | None = None  # [S] on the device: the next step's pending inputs
        self.prompt_logprobs: dict[Request, list[TokenLogprobs]] = {}
        self._host: SamplerOutput | None = None  # the sampler's output, on its way to the host
        self._copied: torch.cuda.Event | None = None

    # Read by async scheduling only: a synchronous engine never builds them.
    @functools.cached_property
    def sample_rows(self) -> dict[Request, int]:
        """Each sampling request's row in ``token_ids``."""
        return {request: row for row, request in enumerate(self.sampling)}

    @functools.cached_property
    def needs_outputs(self) -> bool:
        """Whether a request's next sampling reads its outputs: the host must have them first."""
        return self.reads_outputs or any(request.samples_from_output for request in self.sampling)

    def set_sampled(self, output: SamplerOutput) -> None:
        self.token_ids = output.token_ids
        on_device = output.token_ids.device.type == "cuda"

        def to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
            # A non-blocking copy to the host lands in pinned memory; the event says when it is there.
            return None if tensor is None else tensor.to("cpu", non_blocking=on_device)

        self._host = SamplerOutput(*(to_host(getattr(output, f.name)) for f in fields(SamplerOutput)))
        if on_device:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def result(self) -> StepResult:
        if self._copied is not None:
            self._copied.synchronize()
        result = StepResult(prompt_logprobs=self.prompt_logprobs)
        output, requests = self._host, self.sampling
        if output is None:
            return result
        result.sampled = output.token_ids.tolist()
        result.logprobs = [None] * len(requests)
        if output.top_logprobs is None:
            return result
        sampled_logprobs, ranks = output.sampled_logprobs.tolist(), output.sampled_ranks.tolist()
        top_logprobs, top_ids = output.top_logprobs.tolist(), output.top_token_ids.tolist()
        for row, request in enumerate(requests):
            wanted = request.sampling_params.logprobs
            if wanted is not None:
                result.logprobs[row] = TokenLogprobs(
                    result.sampled[row], sampled_logprobs[row], ranks[row], top_ids[row][:wanted], top_logprobs[row][:wanted]
                )
        return result
