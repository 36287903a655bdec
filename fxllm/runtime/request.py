"""One sequence's state as it moves through the scheduler, cache and runner.

A prompt with ``n`` completions becomes ``n`` requests (``completion_index``
0..n-1) sharing the prompt; prefix caching computes the shared prompt once.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fxllm.metrics import RequestStateStats
from fxllm.runtime.detokenizer import IncrementalDetokenizer, find_stop_string
from fxllm.runtime.logprobs import TokenLogprobs
from fxllm.runtime.multimodal.inputs import MultiModalPrompt
from fxllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fxllm.runtime.structured_outputs.matcher import RequestGrammar

logger = logging.getLogger(__name__)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # max_tokens capped so prompt + output fit max_model_len
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) and the user's stop_token_ids
    detokenizer: IncrementalDetokenizer | None  # None when detokenize=False
    generator: torch.Generator | None = None  # per-request, for seeded sampling
    prompt_index: int = 0  # position of its prompt in the generate() call
    completion_index: int = 0  # 0..n-1 among the completions of one prompt
    bad_word_ids: list[list[int]] = field(default_factory=list)  # token sequences never to complete
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache, or will be once launched steps finish
    # Tokens sampled by a launched step that the host has not seen yet (async scheduling): the
    # next step takes its input from the device, and num_tokens counts them.
    num_pending_outputs: int = 0
    # Replaced (preemption, prefix hits) or appended to, never edited in place: StepInputs
    # mirrors it in numpy incrementally and relies on that.
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks of all_token_ids
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_end: int | None = None  # where a stop string cuts the text
    logprobs: list[TokenLogprobs] | None = None  # one per output token, when asked for
    cumulative_logprob: float | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_committed_blocks: int = 0  # leading full blocks already offered to the prefix cache
    multimodal: MultiModalPrompt | None = None  # images, videos and M-RoPE positions of a vision-language prompt
    cache_salt: str | None = None  # hashed into its first prefix-cache block: other salts never share its blocks
    priority: int = 0  # under scheduling_policy="priority": lower values are scheduled first
    arrival_index: int = 0  # order of arrival: ties of priority, and FCFS
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at its first admission
    stats: RequestStateStats = field(default_factory=RequestStateStats)
    # Image or video index -> its embeddings [tokens, H], from the first step that computes one of its
    # tokens to the step that computes its last (see runtime/multimodal/embedder.py).
    encoder_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    grammar: RequestGrammar | None = None  # under structured outputs: the tokens that may come next

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.logprobs is not None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no logprob

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids) + self.num_pending_outputs

    @property
    def output_complete_when_pending_arrive(self) -> bool:
        """The pending outputs reach max_tokens: the request has nothing more to compute."""
        return self.num_pending_outputs > 0 and len(self.output_token_ids) + self.num_pending_outputs >= self.max_tokens

    @property
    def samples_from_output(self) -> bool:
        """Whether sampling its next token reads the tokens it generated on the host (bad words, a
        grammar, per-request logits processors), so a step cannot be launched for it while one of
        them is still on the device. (Penalties count tokens on the device: runtime/penalty_state.py.)"""
        return bool(self.bad_word_ids) or self.grammar is not None or bool(self.sampling_params.logits_processors)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def text(self) -> str:
        if self.detokenizer is None:
            return ""
        if self.finish_reason is not None:
            return self.detokenizer.final_text[: self.text_end]
        return self.detokenizer.text[: self.text_end]

    def banned_next_tokens(self) -> list[int]:
        """Tokens the next sample may not be: stop tokens before min_tokens, and the last
        token of any bad word whose other tokens the output ends with."""
        banned = []
        if len(self.output_token_ids) + self.num_pending_outputs < self.sampling_params.min_tokens:
            banned.extend(self.stop_token_ids)
        for word in self.bad_word_ids:
            prefix = word[:-1]
            if not prefix or self.output_token_ids[-len(prefix) :] == prefix:
                banned.append(word[-1])
        return banned

    def append_output(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        if self.grammar is not None and not self._grammar_accepts(token_id):
            return
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprobs is not None and self.logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs.chosen_logprob
        params = self.sampling_params
        stops_here = len(self.output_token_ids) >= params.min_tokens and token_id in self.stop_token_ids
        if stops_here:
            # The stop token stays in token_ids; its text joins the output only when asked (as vLLM).
            if self.detokenizer is not None and params.include_stop_str_in_output:
                self.detokenizer.add(token_id)
            self.finish_reason = "stop"
            self.stop_reason = token_id if token_id in params.stop_token_ids else None
            return
        # Only stop strings need the text now; reading it decodes the tokens so far.
        new_text_from = len(self.detokenizer.text) if self.detokenizer is not None and params.stop else 0
        if self.detokenizer is not None:
            self.detokenizer.add(token_id)
        if len(self.output_token_ids) >= params.min_tokens:
            if params.stop:
                found = find_stop_string(self.detokenizer.text, new_text_from, params.stop)
                if found is not None:
                    index, stop = found
                    self.finish_reason, self.stop_reason = "stop", stop
                    self.text_end = index + len(stop) if params.include_stop_str_in_output else index
                    return
        if self.grammar is not None and self.grammar.terminated:
            self.finish_reason = "stop"
            return
        if len(self.output_token_ids) >= self.max_tokens:
            self.finish_reason = "length"

    def _grammar_accepts(self, token_id: int) -> bool:
        """Advance the grammar on a sampled token. One it does not allow (a logits processor put
        back a token the mask had removed) ends the request, "abort", without that token."""
        if self.grammar.accept(token_id):
            return True
        logger.warning(
            "request %s: sampled token %d is not allowed by its structured outputs constraint (a logits processor "
            "may have restored a masked token): the request is aborted", self.request_id, token_id,
        )
        self.finish_reason = "abort"
        return False
