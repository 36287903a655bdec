"""Batched sampling on the device, as vLLM defines it.

Order: raw logits -> the structured-outputs mask of constrained rows (as vLLM, before
logprobs: they are those of the constrained distribution) -> logprobs (vLLM's default:
before any other processing) ->
allowed_token_ids / banned tokens (min_tokens, bad_words) / logit_bias -> custom logits
processors (vLLM's batch-level ones that may change an argmax, then per-request callables) ->
penalties -> greedy argmax, or temperature -> min_p -> argmax-invariant batch-level
processors -> top-k -> top-p -> sample (plain
temperature sampling on a GPU: one Triton pass, sampling_kernels.py).
No loop over the vocabulary; the only per-request Python is building the batch's
tensors and the noise draw of seeded requests (each from its own generator, so a
seed gives the same tokens whatever else is in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxllm.runtime.logits_processors import ProcessorStep, apply_request_processors
from fxllm.runtime.penalty_state import PenaltyState
from fxllm.runtime.request import Request
from fxllm.runtime.structured_outputs.bitmask import StepBitmask


@dataclass
class SamplingBatch:
    """The sampling parameters of the rows being sampled, as device tensors.

    Optional parts are None when no row uses them: the common case runs none of them."""

    all_greedy: bool
    any_greedy: bool
    greedy: torch.Tensor | None  # [B] bool; None when all rows are greedy
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows; None when all are greedy
    top_k: torch.Tensor | None  # [B] int64, vocab size where unset
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    generators: list[torch.Generator | None]
    allowed: torch.Tensor | None  # [B, V] bool: tokens a row may sample
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    penalties: "Penalties | None"
    num_logprobs: int | None  # most top logprobs any row asks for
    grammar: StepBitmask | None = None  # the structured-outputs masks of constrained rows
    processors: ProcessorStep | None = None  # the engine's batch-level logits processors
    # The step's requests, when one of them has per-request logits processors.
    with_request_processors: list[Request] | None = None

    @property
    def processes_logits(self) -> bool:
        parts = (self.allowed, self.banned, self.bias, self.penalties, self.with_request_processors)
        return any(x is not None for x in parts) or (self.processors is not None and self.processors.changes_argmax)

    @classmethod
    def from_requests(
        cls, requests: list[Request], vocab_size: int, device: torch.device, penalty_state: PenaltyState,
        grammar: StepBitmask | None = None, processors: ProcessorStep | None = None,
    ) -> "SamplingBatch":
        params = [r.sampling_params for r in requests]
        greedy = [p.greedy for p in params]
        sampled = [not g for g in greedy]

        def per_row(values: list, dtype: torch.dtype, used: bool) -> torch.Tensor | None:
            if not used:
                return None
            first = values[0]
            if all(value == first for value in values):
                # One value for the whole batch (one SamplingParams, the usual offline call):
                # a fill on the device, not a copy from pageable host memory, which would
                # wait for the step's forward to finish before the host could go on.
                return torch.full((len(values),), first, dtype=dtype, device=device)
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        all_greedy = all(greedy)
        return cls(
            all_greedy=all_greedy,
            any_greedy=any(greedy),
            greedy=per_row(greedy, torch.bool, not all_greedy),
            temperature=per_row([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32, not all_greedy),
            top_k=per_row(top_k, torch.long, any(k < vocab_size and s for k, s in zip(top_k, sampled))),
            top_p=per_row([p.top_p for p in params], torch.float32, any(p.top_p < 1.0 and s for p, s in zip(params, sampled))),
            min_p=per_row([p.min_p for p in params], torch.float32, any(p.min_p > 0.0 and s for p, s in zip(params, sampled))),
            generators=[r.generator for r in requests],
            allowed=_allowed_mask(requests, vocab_size, device),
            banned=_banned_tokens(requests, device),
            bias=_logit_bias(requests, device),
            penalties=Penalties.from_requests(requests, penalty_state),
            num_logprobs=max(asked) if asked else None,
            grammar=grammar,
            processors=processors,
            with_request_processors=requests if any(p.logits_processors for p in params) else None,
        )


@dataclass
class Penalties:
    presence: torch.Tensor  # [B, 1]
    frequency: torch.Tensor  # [B, 1]
    repetition: torch.Tensor  # [B, 1]
    rows: torch.Tensor  # [B] each request's row of the penalty state
    state: PenaltyState

    @classmethod
    def from_requests(cls, requests: list[Request], state: PenaltyState) -> "Penalties | None":
        if not any(r.sampling_params.uses_penalties for r in requests):
            return None
        params = [r.sampling_params for r in requests]
        column = lambda values: torch.tensor(values, dtype=torch.float32).to(state.device, non_blocking=True)[:, None]
        return cls(
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            repetition=column([p.repetition_penalty for p in params]),
            rows=state.rows(requests),
            state=state,
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        output_counts = self.state.counts[self.rows]  # [B, V] occurrences of each token in the output
        seen = self.state.seen[self.rows]  # [B, V] token in prompt or output (repetition penalty)
        # Repetition as HF's processor: divide positive logits, multiply negative ones.
        repeated = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
        logits = torch.where(seen, repeated, logits)
        # Presence and frequency as OpenAI defines them, over generated tokens only.
        return logits - self.presence * (output_counts > 0) - self.frequency * output_counts

    def record(self, token_ids: torch.Tensor) -> None:
        """The step's sampled tokens join their requests' counts."""
        self.state.record(self.rows, token_ids)


def _allowed_mask(requests: list[Request], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    if not any(r.sampling_params.allowed_token_ids for r in requests):
        return None
    mask = torch.ones(len(requests), vocab_size, dtype=torch.bool)
    for row, request in enumerate(requests):
        allowed = request.sampling_params.allowed_token_ids
        if allowed:
            mask[row] = False
            mask[row, allowed] = True
    return mask.to(device)


def _banned_tokens(requests: list[Request], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows, tokens = [], []
    for row, request in enumerate(requests):
        for token in request.banned_next_tokens():
            rows.append(row)
            tokens.append(token)
    if not rows:
        return None
    return torch.tensor(rows, device=device), torch.tensor(tokens, device=device)


def _logit_bias(requests: list[Request], device: torch.device):
    rows, tokens, values = [], [], []
    for row, request in enumerate(requests):
        for token, value in (request.sampling_params.logit_bias or {}).items():
            rows.append(row)
            tokens.append(token)
            values.append(float(value))
    if not rows:
        return None
    return (torch.tensor(rows, device=device), torch.tensor(tokens, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # With num_logprobs: raw logprobs of the sampled tokens, their ranks, and the top-N.
    sampled_logprobs: torch.Tensor | None = None  # [B]
    sampled_ranks: torch.Tensor | None = None  # [B], 1 = most likely
    top_logprobs: torch.Tensor | None = None  # [B, N]
    top_token_ids: torch.Tensor | None = None  # [B, N]


class Sampler:
    def __init__(self, generator: torch.Generator, one_pass_kernel: bool = True):
        self.generator = generator  # for requests without a seed
        # Plain temperature sampling on a GPU as one Triton pass (sampling_kernels.py); False
        # keeps every batch on the torch path (the comparison bench_throughput makes).
        self.one_pass_kernel = one_pass_kernel

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # [B, V] in the model's dtype: fp32 where a step needs it, the one-pass sampler reads
        # them as they are (an argmax is the same in either). Masked in place: the caller's
        # tensor holds this step's logits only.
        if batch.grammar is not None:
            batch.grammar.apply(logits)
        raw_logprobs = logits.float().log_softmax(dim=-1) if batch.num_logprobs is not None else None
        if batch.processes_logits:
            logits = _process(logits.float(), batch)
        # Greedy rows' tokens; not computed when no row is greedy (a pass over [B, V]).
        greedy_tokens = logits.argmax(dim=-1) if batch.any_greedy else None
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            sampled = self._sample(logits, batch)
            tokens = torch.where(batch.greedy, greedy_tokens, sampled) if batch.any_greedy else sampled
        if batch.penalties is not None:
            batch.penalties.record(tokens)
        output = SamplerOutput(tokens)
        if raw_logprobs is not None:
            output.sampled_logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0]
            output.sampled_ranks = (raw_logprobs > output.sampled_logprobs[:, None]).sum(dim=-1) + 1
            output.top_logprobs, output.top_token_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
        return output

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """One token per row from softmax(logits / temperature), after min_p, top-k and top-p."""
        if self.one_pass_kernel and _samples_in_one_pass(logits, batch):
            from fxllm.runtime.sampling_kernels import draw_seeds, gumbel_max_sample  # Triton: CUDA only

            seeds = draw_seeds(logits.shape[0], batch.generators, self.generator, logits.device)
            return gumbel_max_sample(logits, batch.temperature, seeds)
        logits = logits.float() / batch.temperature[:, None]
        if batch.min_p is not None:
            logits = _apply_min_p(logits, batch.min_p)
        if batch.processors is not None:
            logits = batch.processors.apply(logits, argmax_invariant=True)
        if batch.top_k is not None or batch.top_p is not None:
            logits = _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        return _sample_exponential(logits, batch.generators, self.generator)


def _samples_in_one_pass(logits: torch.Tensor, batch: SamplingBatch) -> bool:
    """Plain temperature sampling on a GPU runs as one Triton pass (sampling_kernels.py);
    min_p, top-k and top-p need the whole row's distribution first, and stay in torch."""
    plain = batch.min_p is None and batch.top_k is None and batch.top_p is None
    return logits.is_cuda and plain and (batch.processors is None or not batch.processors.has_argmax_invariant)


def _process(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.allowed is not None:
        logits = logits.masked_fill(~batch.allowed, float("-inf"))
    if batch.banned is not None:
        rows, tokens = batch.banned
        logits = logits.index_put((rows, tokens), torch.tensor(float("-inf"), device=logits.device))
    if batch.bias is not None:
        rows, tokens, values = batch.bias
        logits = logits.index_put((rows, tokens), values, accumulate=True)
    if batch.processors is not None:
        logits = batch.processors.apply(logits, argmax_invariant=False)
    if batch.with_request_processors is not None:
        apply_request_processors(logits, batch.with_request_processors)
    if batch.penalties is not None:
        logits = batch.penalties.apply(logits)
    return logits


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if top_k is not None:
        ranks = torch.arange(vocab, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does. The first token is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _sample_exponential(
    logits: torch.Tensor, generators: list[torch.Generator | None], default: torch.Generator
) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) draws a token with probability p = softmax(logits) (no
    CPU sync). Taken as argmax(logits - log E), the same argmax without the softmax's passes
    over [B, V]. ``logits`` is overwritten."""
    noise = torch.empty_like(logits).exponential_(generator=default)
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return logits.sub_(noise.log_()).argmax(dim=-1)
