"""Batched sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

No loop over the vocabulary; the only per-request Python is the noise draw of
seeded requests (each from its own generator, so a seed gives the same tokens
whatever else is in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxllm.runtime.request import Request
from fxllm.sampling_params import GREEDY_TEMPERATURE_EPSILON


@dataclass
class SamplingBatch:
    """The sampling parameters of the rows being sampled, as device tensors."""

    all_greedy: bool
    any_greedy: bool
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows
    top_k: torch.Tensor | None  # [B] int64, vocab size where unset; None if no row uses it
    top_p: torch.Tensor | None  # [B] float32; None if no row uses it
    generators: list[torch.Generator | None]

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int, device: torch.device) -> "SamplingBatch":
        params = [r.sampling_params for r in requests]
        greedy = [p.temperature < GREEDY_TEMPERATURE_EPSILON for p in params]
        use_top_k = any(p.top_k > 0 and not g for p, g in zip(params, greedy))
        use_top_p = any(p.top_p < 1.0 and not g for p, g in zip(params, greedy))
        return cls(
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            greedy=torch.tensor(greedy, device=device),
            temperature=torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy)], dtype=torch.float32, device=device
            ),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
            if use_top_k
            else None,
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device) if use_top_p else None,
            generators=[r.generator for r in requests],
        )


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # for requests without a seed

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [B, V] -> token ids [B] (int64, on the logits' device)."""
        logits = logits.float()
        greedy_tokens = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_tokens
        logits = logits / batch.temperature[:, None]
        if batch.top_k is not None or batch.top_p is not None:
            logits = _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = logits.softmax(dim=-1)
        sampled = _sample_exponential(probs, batch.generators, self.generator)
        return torch.where(batch.greedy, greedy_tokens, sampled) if batch.any_greedy else sampled


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
    probs: torch.Tensor, generators: list[torch.Generator | None], default: torch.Generator
) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) draws a token with probability p (no CPU sync)."""
    noise = torch.empty_like(probs).exponential_(generator=default)
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
