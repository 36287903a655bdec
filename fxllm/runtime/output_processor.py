"""Finished requests -> the ``RequestOutput`` of each prompt, in input order."""

from __future__ import annotations

from typing import Any

from fxllm.outputs import CompletionOutput, Logprob, RequestOutput
from fxllm.runtime.logprobs import TokenLogprobs
from fxllm.runtime.request import Request


def request_outputs(requests: list[Request], num_prompts: int, tokenizer: Any) -> list[RequestOutput]:
    """One output per prompt, holding its ``n`` completions in index order."""
    by_prompt: list[list[Request]] = [[] for _ in range(num_prompts)]
    for request in requests:
        by_prompt[request.prompt_index].append(request)
    return [_request_output(group, tokenizer) for group in by_prompt]


def _request_output(requests: list[Request], tokenizer: Any) -> RequestOutput:
    first = requests[0]
    decode = _token_text(tokenizer) if first.detokenizer is not None and tokenizer is not None else None
    completions = [
        CompletionOutput(
            index=request.completion_index,
            text=request.text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob,
            logprobs=_dicts(request.logprobs, decode),
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
        )
        for request in sorted(requests, key=lambda r: r.completion_index)
    ]
    return RequestOutput(
        request_id=first.request_id,
        prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids,
        outputs=completions,
        finished=all(request.finished for request in requests),
        prompt_logprobs=_dicts(first.prompt_logprobs, decode),
        metrics=first.stats,
        num_cached_tokens=first.num_cached_tokens,
    )


def _dicts(positions: list[TokenLogprobs | None] | None, decode: Any) -> list[dict[int, Logprob] | None] | None:
    if positions is None:
        return None
    return [None if position is None else position.as_dict(decode) for position in positions]


def _token_text(tokenizer: Any):
    """Each token's own text, decoded once per output (vLLM's ``decoded_token``)."""
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return decode
