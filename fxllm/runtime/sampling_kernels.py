"""Temperature sampling in one pass over the logits (Triton; CUDA, or the interpreter in tests).

The token is argmax(logits / T + G) with G standard Gumbel noise, which draws it with
probability softmax(logits / T) (the same draw as the sampler's argmax(p / E), E ~ Exp(1):
G = -log E). Each program reads one chunk of one row of the logits in their own dtype,
draws its noise in registers (Philox, from the row's seed and the token's index) and
keeps the chunk's best score; a second pass picks each row's best chunk. The torch path
takes six passes over [B, V] fp32 for the same draw (cast, scale, noise, log, add,
argmax).

A row's noise depends only on its seed, so a request with its own generator (a seeded
request) gets the same tokens whatever else shares the step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logits per program: a row of a 150k vocabulary is ~37 programs, enough to fill the GPU
# at batch 1 and few enough partial results to reduce in one small pass.
CHUNK = 4096
NUM_WARPS = 8
SEED_LIMIT = 2**62  # seeds are drawn below this (int64, positive)


@triton.jit
def _gumbel_max_chunk_kernel(
    logits_ptr,  # [B, V], any dtype, unit stride along V
    temperature_ptr,  # [B] fp32
    seeds_ptr,  # [B] int64
    best_score_ptr,  # [B, num_chunks] fp32
    best_index_ptr,  # [B, num_chunks] int32
    vocab_size,
    stride_logits_row,
    num_chunks,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    index = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = index < vocab_size
    logits = tl.load(logits_ptr + row.to(tl.int64) * stride_logits_row + index, mask=valid, other=float("-inf"))
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    uniform = tl.rand(seed, index)  # in [0, 1): u = 0 gives -inf noise, never chosen
    gumbel = -tl.log(-tl.log(uniform))
    score = tl.where(valid, logits.to(tl.float32) / temperature + gumbel, float("-inf"))
    best = tl.argmax(score, axis=0)
    best_score = tl.max(score, axis=0)
    tl.store(best_score_ptr + row * num_chunks + chunk, best_score)
    tl.store(best_index_ptr + row * num_chunks + chunk, (chunk * CHUNK + best).to(tl.int32))


def gumbel_max_sample(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """[B] int64 tokens drawn from softmax(logits / temperature) per row.

    ``logits`` [B, V] (any float dtype), ``temperature`` [B] fp32 (> 0), ``seeds`` [B] int64;
    ``chunk``: logits per program (a power of two; small ones keep interpreter tests quick)."""
    num_rows, vocab_size = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(vocab_size, chunk)
    best_score = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    if num_rows:
        _gumbel_max_chunk_kernel[(num_rows, num_chunks)](
            logits, temperature, seeds, best_score, best_index, vocab_size, logits.stride(0), num_chunks,
            CHUNK=chunk, num_warps=NUM_WARPS,
        )
    best_chunk = best_score.argmax(dim=1, keepdim=True)
    return best_index.gather(1, best_chunk)[:, 0].long()


def draw_seeds(num_rows: int, generators: list[torch.Generator | None], default: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """[B] int64 seeds for one step's noise, on the device (no host sync): from ``default``
    for every row, then from its own generator for a seeded request's row."""
    seeds = torch.randint(SEED_LIMIT, (num_rows,), generator=default, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            seeds[row : row + 1].random_(SEED_LIMIT, generator=generator)
    return seeds
