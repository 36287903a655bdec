"""Routing and sorting a step's tokens by expert on the GPU, with no host sync.

The grouped GEMM (triton_experts.py) multiplies blocks of ``block_m`` rows that all go to
one expert. An *entry* is one (token, slot) pair, numbered ``token * top_k + slot``; this
module lays the entries out expert after expert, each expert's group padded with empty rows
to a multiple of ``block_m``, and says which expert each block belongs to. Every buffer is
sized from T, top_k, E and block_m alone (the number of blocks actually used stays on the
device), so a CUDA graph captured at one T replays for any routing.

Three kernels:
1. route: per chunk of tokens, softmax over the experts, the top_k (renormalized where the
   config says so), and how many entries of the chunk each expert got;
2. plan (one program): each expert's group start, each chunk's first row in every group,
   the empty rows that pad each group, each block's expert, and the rows in use;
3. scatter: per chunk, each entry to its row (its chunk's first row in its expert's group
   plus its rank among the chunk's entries of that expert), so the order is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fxllm.utils import cdiv

# Elements of the [tokens, top_k, experts] one-hot tile a routing program holds: sets how many
# tokens one chunk covers (fewer for models with many experts).
ROUTING_TILE_ELEMENTS = 8192
# Chunks the plan program sums per iteration, and blocks whose expert it finds per iteration.
PLAN_CHUNKS_PER_ITERATION = 16
PLAN_BLOCKS_PER_ITERATION = 32


@dataclass(frozen=True)
class ExpertSort:
    """A step's routing, and its entries grouped by expert for the grouped GEMM."""

    weights: torch.Tensor  # [T, top_k] float32: each entry's routing weight
    expert_ids: torch.Tensor  # [T, top_k] int32
    # [max_blocks * block_m] int32: entries expert after expert, each group padded to a multiple of
    # block_m with num_entries (an empty row); rows past num_rows are never read.
    sorted_entries: torch.Tensor
    block_experts: torch.Tensor  # [max_blocks] int32: the expert of each block of block_m rows
    num_rows: torch.Tensor  # [1] int32: rows in use (a multiple of block_m)
    max_blocks: int  # blocks of the largest possible layout: the grid of the GEMMs


def max_sorted_blocks(num_entries: int, num_experts: int, block_m: int) -> int:
    """Blocks of the largest layout: every entry, plus up to block_m - 1 empty rows for each of
    the at most min(E, entries) experts that get any."""
    return cdiv(num_entries + min(num_experts, num_entries) * (block_m - 1), block_m)


def routing_block_tokens(num_experts: int, top_k: int) -> int:
    """Tokens per routing chunk: a power of two whose one-hot tile fits ROUTING_TILE_ELEMENTS."""
    per_token = triton.next_power_of_2(top_k) * triton.next_power_of_2(num_experts)
    fitting = max(1, ROUTING_TILE_ELEMENTS // per_token)
    return 1 << (fitting.bit_length() - 1)


@triton.jit(do_not_specialize=["num_tokens"])
def _route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    chunk_counts_ptr,
    num_tokens,
    stride_logits_token,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
):
    chunk = tl.program_id(0)
    tokens = chunk * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    experts = tl.arange(0, EXPERTS_PAD)
    slots = tl.arange(0, TOP_K_PAD)
    token_valid = tokens < num_tokens
    expert_valid = experts < NUM_EXPERTS
    logits = tl.load(
        logits_ptr + tokens[:, None].to(tl.int64) * stride_logits_token + experts[None, :],
        mask=token_valid[:, None] & expert_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    logits = tl.where(expert_valid[None, :], logits, float("-inf"))
    exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probabilities = exps / tl.sum(exps, axis=1)[:, None]  # [BLOCK_TOKENS, EXPERTS_PAD]
    # Padding experts below any probability: never chosen, even over an underflowed zero.
    probabilities = tl.where(expert_valid[None, :], probabilities, -2.0)
    top_weights = tl.zeros((BLOCK_TOKENS, TOP_K_PAD), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_TOKENS, TOP_K_PAD), dtype=tl.int32)
    counts = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.argmax(probabilities, axis=1)  # [BLOCK_TOKENS]: the first of equals, as topk
        best_probability = tl.max(probabilities, axis=1)
        top_weights = tl.where(slots[None, :] == slot, best_probability[:, None], top_weights)
        top_ids = tl.where(slots[None, :] == slot, best[:, None], top_ids)
        chosen = experts[None, :] == best[:, None]  # [BLOCK_TOKENS, EXPERTS_PAD]
        probabilities = tl.where(chosen, -1.0, probabilities)
        counts += tl.sum((chosen & token_valid[:, None]).to(tl.int32), axis=0)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]
    entries = tokens[:, None].to(tl.int64) * TOP_K + slots[None, :]
    entry_valid = token_valid[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + entries, top_weights, mask=entry_valid)
    tl.store(ids_ptr + entries, top_ids, mask=entry_valid)
    tl.store(chunk_counts_ptr + chunk * EXPERTS_PAD + experts, counts)


@triton.jit(do_not_specialize=["num_chunks", "num_entries", "max_blocks"])
def _plan_kernel(
    chunk_counts_ptr,
    chunk_offsets_ptr,
    sorted_entries_ptr,
    block_experts_ptr,
    num_rows_ptr,
    num_chunks,
    num_entries,
    max_blocks,
    EXPERTS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNKS_PER_ITERATION: tl.constexpr,
    BLOCKS_PER_ITERATION: tl.constexpr,
):
    experts = tl.arange(0, EXPERTS_PAD)
    totals = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)
    for first in range(0, num_chunks, CHUNKS_PER_ITERATION):
        chunks = first + tl.arange(0, CHUNKS_PER_ITERATION)
        counts = tl.load(
            chunk_counts_ptr + chunks[:, None] * EXPERTS_PAD + experts[None, :], mask=chunks[:, None] < num_chunks, other=0
        )
        totals += tl.sum(counts, axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    group_ends = tl.cumsum(padded, axis=0)
    group_starts = group_ends - padded
    tl.store(num_rows_ptr, tl.sum(padded, axis=0))
    # Each chunk's first row in each expert's group: the group's start plus the entries of that
    # expert in the chunks before it.
    next_rows = group_starts
    for first in range(0, num_chunks, CHUNKS_PER_ITERATION):
        chunks = first + tl.arange(0, CHUNKS_PER_ITERATION)
        offsets = chunks[:, None] * EXPERTS_PAD + experts[None, :]
        in_range = chunks[:, None] < num_chunks
        counts = tl.load(chunk_counts_ptr + offsets, mask=in_range, other=0)
        tl.store(chunk_offsets_ptr + offsets, next_rows[None, :] + tl.cumsum(counts, axis=0) - counts, mask=in_range)
        next_rows += tl.sum(counts, axis=0)
    # The rows that pad each group to a multiple of BLOCK_M are empty.
    pad_rows = tl.arange(0, BLOCK_M)
    tl.store(
        sorted_entries_ptr + (group_starts + totals)[:, None] + pad_rows[None, :],
        tl.zeros((EXPERTS_PAD, BLOCK_M), dtype=tl.int32) + num_entries,
        mask=pad_rows[None, :] < (padded - totals)[:, None],
    )
    # A block belongs to the expert whose group holds its first row: the number of groups
    # that end at or before it (empty groups end where they start and are passed over).
    for first in range(0, max_blocks, BLOCKS_PER_ITERATION):
        blocks = first + tl.arange(0, BLOCKS_PER_ITERATION)
        ended = group_ends[None, :] <= (blocks * BLOCK_M)[:, None]
        tl.store(block_experts_ptr + blocks, tl.sum(ended.to(tl.int32), axis=1), mask=blocks < max_blocks)


@triton.jit(do_not_specialize=["num_entries"])
def _scatter_kernel(
    ids_ptr,
    chunk_offsets_ptr,
    sorted_entries_ptr,
    num_entries,
    ENTRIES_PER_CHUNK: tl.constexpr,
    ENTRIES_PAD: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
):
    chunk = tl.program_id(0)
    local = tl.arange(0, ENTRIES_PAD)
    entries = chunk * ENTRIES_PER_CHUNK + local
    valid = (local < ENTRIES_PER_CHUNK) & (entries < num_entries)
    ids = tl.load(ids_ptr + entries, mask=valid, other=EXPERTS_PAD)  # EXPERTS_PAD: no expert's column
    one_hot = (ids[:, None] == tl.arange(0, EXPERTS_PAD)[None, :]).to(tl.int32)  # [ENTRIES_PAD, EXPERTS_PAD]
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1  # among the chunk's entries of its expert
    first_row = tl.load(chunk_offsets_ptr + chunk * EXPERTS_PAD + ids, mask=valid, other=0)
    tl.store(sorted_entries_ptr + first_row + rank, entries, mask=valid)


def sort_by_expert(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
    block_m: int,
    block_tokens: int | None = None,  # tokens per routing chunk (tests force several chunks)
) -> ExpertSort:
    router_logits = router_logits.contiguous()  # the route kernel steps along experts one element at a time
    num_tokens, num_experts = router_logits.shape
    device = router_logits.device
    block_tokens = block_tokens or routing_block_tokens(num_experts, top_k)
    experts_pad = triton.next_power_of_2(num_experts)
    num_chunks = cdiv(num_tokens, block_tokens)
    num_entries = num_tokens * top_k
    max_blocks = max_sorted_blocks(num_entries, num_experts, block_m)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    chunk_counts = torch.empty(num_chunks, experts_pad, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)
    sorted_entries = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_experts = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    _route_kernel[(num_chunks,)](
        router_logits, weights, expert_ids, chunk_counts, num_tokens, router_logits.stride(0),
        NUM_EXPERTS=num_experts, TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_TOKENS=block_tokens,
        EXPERTS_PAD=experts_pad, TOP_K_PAD=triton.next_power_of_2(top_k),
    )
    _plan_kernel[(1,)](
        chunk_counts, chunk_offsets, sorted_entries, block_experts, num_rows, num_chunks, num_entries, max_blocks,
        EXPERTS_PAD=experts_pad, BLOCK_M=block_m, CHUNKS_PER_ITERATION=PLAN_CHUNKS_PER_ITERATION,
        BLOCKS_PER_ITERATION=PLAN_BLOCKS_PER_ITERATION,
    )
    entries_per_chunk = block_tokens * top_k
    _scatter_kernel[(num_chunks,)](
        expert_ids, chunk_offsets, sorted_entries, num_entries,
        ENTRIES_PER_CHUNK=entries_per_chunk, ENTRIES_PAD=triton.next_power_of_2(entries_per_chunk),
        EXPERTS_PAD=experts_pad,
    )
    return ExpertSort(weights, expert_ids, sorted_entries, block_experts, num_rows, max_blocks)
