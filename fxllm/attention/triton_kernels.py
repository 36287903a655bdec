"""Triton kernels for paged attention, and the thin functions that launch them.

Three jobs, one kernel each (plus the reduce of the split decode):
- ``write_kv_cache``: scatter this step's K/V into their cache slots (slot -1 skipped).
- ``unified_attention``: any mix of prefill chunks and decodes. One program per
  (tile of query tokens of one request, KV head); it finds its request by a binary
  search over ``query_start_loc`` on the device, so the grid depends only on T and B.
- ``split_decode_attention``: one query token per request (flash-decoding). The
  context of each request is cut into ``num_splits`` ranges of KV tiles, one program
  each, which write partial (max, sum, accumulator) to scratch; a reduce kernel merges
  them. ``num_splits`` comes from shapes (B, KV heads, max blocks per sequence). The
  split holding the new token's position can cache the step's K/V first, which
  saves decode steps the write kernel's launch.

Everything a kernel reads per step lives in device tensors (no host sync), so the
launches are safe to capture in CUDA graphs (docs/ARCHITECTURE.md, contract 3).

Layouts: query/out [T, num_heads, head_dim]; key/value [T, num_kv_heads, head_dim];
key_cache/value_cache [num_blocks, block_size, num_kv_heads, head_dim]. Any strides
(a query sliced out of a fused QKV projection is not contiguous); Triton specializes
strides equal to 1, so the common contiguous case costs nothing.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

# tl.dot needs every dimension >= 16.
MIN_DOT_DIM = 16
# Beyond this the fp32 accumulator of a tile no longer fits in registers.
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # softmax runs on exp2: exp(x) = exp2(x * log2(e))

# Tile sizes, warps and stages come from sweeps on an H100 (bf16, 32/8 heads, head_dim
# 128), taking the setting most even across the shapes tried: for the unified kernel
# rows 64-128, tiles 32-64, 4-8 warps, 2-3 stages on prefills of 512-4096 tokens and a
# mixed batch; for decode tiles 16-64, 4-8 warps, 2-4 stages, 4-8 programs per SM at
# batch 1-256 and contexts 2k-8k.
#
# Query rows (query tokens x query heads of one KV head) per unified-kernel program:
# many, to reuse each loaded K/V tile across prefill queries; few enough to keep the
# fp32 accumulator [rows, head_dim] in registers.
UNIFIED_ROWS = 64
UNIFIED_ROWS_LARGE_HEAD = 32  # head_dim > LARGE_HEAD_DIM
LARGE_HEAD_DIM = 128
# Keys per iteration of the KV loop, at most. A tile gathers its keys' physical blocks
# one by one, so it need not match (or divide) the cache's block size. Wide heads and
# fp32 get fewer keys, so that the pipelined K/V tiles fit in shared memory.
UNIFIED_TILE_KEYS = 64
DECODE_TILE_KEYS = 64
TILE_BYTES = 16 * 1024  # one K (or V) tile: 64 keys of bf16 head_dim 128
UNIFIED_NUM_WARPS = 4
UNIFIED_NUM_STAGES = 2
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3  # K/V tiles in flight per program: decode waits on memory
REDUCE_NUM_WARPS = 4
WRITE_NUM_WARPS = 1  # a KV-write program moves one head_dim row of K and of V
# Decode splits: aim for this many programs per SM so short batches still fill the
# GPU (and the last wave is a small part of the work), but never cut one context into
# more than MAX_DECODE_SPLITS pieces (the reduce then costs more than it saves).
DECODE_PROGRAMS_PER_SM = 8
MAX_DECODE_SPLITS = 32
# Without CUDA (the interpreter, in tests) there is no SM count to fill.
INTERPRETER_SM_COUNT = 4


def padded_head_dim(head_dim: int) -> int:
    """Register tiles are powers of two (>= 16 for tl.dot); extra lanes are masked off."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention backend supports head_dim 1..{MAX_HEAD_DIM}, got {head_dim}")
    return max(MIN_DOT_DIM, triton.next_power_of_2(head_dim))


def _tile_keys(max_keys: int, head_dim: int, dtype: torch.dtype) -> int:
    fitting = TILE_BYTES // (padded_head_dim(head_dim) * dtype.itemsize)
    return max(MIN_DOT_DIM, min(max_keys, fitting))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 (10-bit mantissa) on tensor cores;
    # the fp32 engine is tested for identical tokens against an fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bf16 tiles as raw 16-bit integers (it stores them
    # as uint16); widening first is exact, since a product of two bf16 fits fp32.
    return triton.knobs.runtime.interpret and dtype == torch.bfloat16


def _window_args(sliding_window: int | None) -> tuple[int, bool]:
    """(window, HAS_WINDOW): a runtime int behind a compile-time flag, so layers without
    a window pay nothing and layers with different windows share one compiled kernel."""
    return (sliding_window, True) if sliding_window is not None else (0, False)


# ---------------------------------------------------------------------------------------
# KV-cache write
# ---------------------------------------------------------------------------------------


@triton.jit
def _cache_kv_row(
    key_row_ptr,  # one token's row of one KV head
    value_row_ptr,
    stride_key_dim,
    stride_value_dim,
    key_cache_ptr,
    value_cache_ptr,
    slot,
    kv_head,
    block_size,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    """Store one token's K/V row of one KV head into its cache slot (slot -1, padding: nothing)."""
    if slot >= 0:
        slot = slot.to(tl.int64)
        dims = tl.arange(0, HEAD_PAD)
        dim_valid = dims < HEAD_DIM
        key = tl.load(key_row_ptr + dims * stride_key_dim, mask=dim_valid)
        value = tl.load(value_row_ptr + dims * stride_value_dim, mask=dim_valid)
        cache_offset = (
            (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot
            + kv_head * stride_cache_head + dims * stride_cache_dim
        )
        tl.store(key_cache_ptr + cache_offset, key.to(key_cache_ptr.dtype.element_ty), mask=dim_valid)
        tl.store(value_cache_ptr + cache_offset, value.to(value_cache_ptr.dtype.element_ty), mask=dim_valid)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    block_size,
    stride_key_token,
    stride_key_head,
    stride_key_dim,
    stride_value_token,
    stride_value_head,
    stride_value_dim,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    _cache_kv_row(
        key_ptr + token * stride_key_token + kv_head * stride_key_head,
        value_ptr + token * stride_value_token + kv_head * stride_value_head,
        stride_key_dim,
        stride_value_dim,
        key_cache_ptr,
        value_cache_ptr,
        tl.load(slot_mapping_ptr + token),
        kv_head,
        block_size,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        stride_cache_dim,
        HEAD_DIM,
        HEAD_PAD,
    )


def write_kv_cache(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = padding
) -> None:
    """Scatter this step's K/V into their cache slots; slot -1 (padding) is skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key_cache.shape[1],
        *key.stride(),
        *value.stride(),
        *key_cache.stride(),
        HEAD_DIM=head_dim,
        HEAD_PAD=triton.next_power_of_2(head_dim),
        num_warps=WRITE_NUM_WARPS,
    )


# ---------------------------------------------------------------------------------------
# Shared pieces of the attention kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """tl.dot with fp32 accumulation; DOT_IN_FP32 only under the interpreter (see _dot_in_fp32)."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tiles(
    query,  # [ROWS, HEAD_PAD] in the cache dtype
    query_pos,  # [ROWS] position of each row's query token in its sequence
    acc,  # [ROWS, HEAD_PAD] fp32, unnormalized output
    running_max,  # [ROWS] fp32, in log2 units
    running_sum,  # [ROWS] fp32
    key_cache_ptr,
    value_cache_ptr,
    table_ptr,  # this request's block-table row
    kv_head,
    tile_begin,
    tile_end,
    kv_end,  # keys at positions >= kv_end are not read
    scale_log2,
    window,
    block_size,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Online softmax over KV tiles [tile_begin, tile_end) of one request and KV head."""
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_DIM
    for tile in range(tile_begin, tile_end):
        pos = tile * TILE_N + tl.arange(0, TILE_N)  # [TILE_N]
        key_valid = pos < kv_end
        # Positions past kv_end may index past the table's width: mask them.
        physical_block = tl.load(table_ptr + pos // block_size, mask=key_valid, other=0).to(tl.int64)
        slot_offset = (
            physical_block * stride_cache_block + (pos % block_size) * stride_cache_slot + kv_head * stride_cache_head
        )
        # Masked lanes read 0, never the slot's stale (maybe NaN) memory.
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        kv_offset = slot_offset[:, None] + dims[None, :] * stride_cache_dim  # [TILE_N, HEAD_PAD]
        key = tl.load(key_cache_ptr + kv_offset, mask=kv_mask, other=0.0)
        scores = _dot(query, tl.trans(key), DOT_PRECISION, DOT_IN_FP32) * scale_log2  # [ROWS, TILE_N]
        visible = key_valid[None, :] & (pos[None, :] <= query_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (query_pos[:, None] - pos[None, :] < window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # A row with nothing visible yet keeps max -inf; subtract 0 then, not -inf (NaN).
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)
        probs = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(running_max - shift)
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        value = tl.load(value_cache_ptr + kv_offset, mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + _dot(probs.to(value.dtype), value, DOT_PRECISION, DOT_IN_FP32)
        running_max = new_max
    return acc, running_max, running_sum


@triton.jit
def _find_request(query_start_loc_ptr, q_block, num_requests, BLOCK_Q: tl.constexpr):
    """The request owning query tile ``q_block``.

    Request i's tiles are numbered from query_start_loc[i] // BLOCK_Q + i: that start
    is strictly increasing in i and leaves each request room for all its tiles, so the
    owner is the last request whose start is <= q_block (a binary search).
    """
    low = q_block * 0  # an int32 scalar, as the loop will make it
    high = low + num_requests
    while low < high:
        mid = (low + high) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            low = mid + 1
        else:
            high = mid
    return low - 1


# ---------------------------------------------------------------------------------------
# Unified kernel: prefill chunks, decodes, or any mix
# ---------------------------------------------------------------------------------------


# The request count changes every step: specializing on it (== 1, divisible by 16) would
# compile the kernel again, for a second or so, the first time a step hits each case.
@triton.jit(do_not_specialize=["num_requests"])
def _unified_attention_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    window,
    num_requests,
    block_size,
    stride_query_token,
    stride_query_head,
    stride_query_dim,
    stride_out_token,
    stride_out_head,
    stride_out_dim,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    stride_table_row,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    request = _find_request(query_start_loc_ptr, q_block, num_requests, BLOCK_Q)
    query_start = tl.load(query_start_loc_ptr + request)
    query_len = tl.load(query_start_loc_ptr + request + 1) - query_start
    local_block = q_block - (query_start // BLOCK_Q + request)
    if local_block * BLOCK_Q >= query_len:  # a spare tile of the grid's upper bound
        return
    seq_len = tl.load(seq_lens_ptr + request)
    context_len = seq_len - query_len  # keys cached before this step

    # Row r holds query token r // QUERIES_PER_KV of the tile and query head
    # r % QUERIES_PER_KV of this KV head's group: GQA shares each K/V tile.
    rows = tl.arange(0, BLOCK_M)
    token_in_request = local_block * BLOCK_Q + rows // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (token_in_request < query_len)
    query_pos = context_len + token_in_request
    token = (query_start + token_in_request).to(tl.int64)
    dims = tl.arange(0, HEAD_PAD)
    io_mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    query = tl.load(
        query_ptr
        + token[:, None] * stride_query_token
        + head[:, None] * stride_query_head
        + dims[None, :] * stride_query_dim,
        mask=io_mask,
        other=0.0,
    ).to(key_cache_ptr.dtype.element_ty)

    # Causal: the tile's last query sees keys up to its own position.
    kv_end = context_len + tl.minimum((local_block + 1) * BLOCK_Q, query_len)
    tile_begin = 0
    if HAS_WINDOW:  # skip tiles that are out of the window for every query of the tile
        first_query_pos = context_len + local_block * BLOCK_Q
        tile_begin = tl.maximum(first_query_pos - window + 1, 0) // TILE_N
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, running_max, running_sum = _attend_tiles(
        query,
        query_pos,
        acc,
        running_max,
        running_sum,
        key_cache_ptr,
        value_cache_ptr,
        block_tables_ptr + request.to(tl.int64) * stride_table_row,
        kv_head,
        tile_begin,
        tl.cdiv(kv_end, TILE_N),
        kv_end,
        scale_log2,
        window,
        block_size,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        stride_cache_dim,
        HEAD_DIM,
        HEAD_PAD,
        TILE_N,
        HAS_WINDOW,
        DOT_PRECISION,
        DOT_IN_FP32,
    )
    result = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :] * stride_out_dim,
        result.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


def unified_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out: torch.Tensor,  # [T, num_heads, head_dim], written in place
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [B] int32, including this step's tokens
    query_start_loc: torch.Tensor,  # [B + 1] int32
    scale: float,
    sliding_window: int | None = None,
) -> None:
    """Causal paged attention for every query token of the step (the K/V already cached)."""
    num_tokens, num_heads, head_dim = query.shape
    num_requests = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    if num_tokens == 0 or num_requests == 0:
        return
    queries_per_kv = num_heads // num_kv_heads
    rows = UNIFIED_ROWS if head_dim <= LARGE_HEAD_DIM else UNIFIED_ROWS_LARGE_HEAD
    block_m = max(rows, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    # Request i uses at most query_len_i // block_q + 1 tiles: T // block_q + B bounds
    # the total from shapes alone; spare programs exit at once.
    grid = (num_tokens // block_q + num_requests, num_kv_heads)
    window, has_window = _window_args(sliding_window)
    _unified_attention_kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * LOG2E,
        window,
        num_requests,
        key_cache.shape[1],
        *query.stride(),
        *out.stride(),
        *key_cache.stride(),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=_tile_keys(UNIFIED_TILE_KEYS, head_dim, key_cache.dtype),
        HAS_WINDOW=has_window,
        DOT_PRECISION=_dot_precision(key_cache.dtype),
        DOT_IN_FP32=_dot_in_fp32(key_cache.dtype),
        num_warps=UNIFIED_NUM_WARPS,
        num_stages=UNIFIED_NUM_STAGES,
    )


# ---------------------------------------------------------------------------------------
# Split decode (flash-decoding): one query token per request
# ---------------------------------------------------------------------------------------


@triton.jit
def _decode_split_range(seq_len, window, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(first tile, tiles per split, tile count) of a decode query at seq_len - 1.

    The decode and reduce kernels both derive the split ranges from seq_len (on the
    device), so every split gets an equal share of THIS request's context whatever the
    batch's longest one is.
    """
    num_tiles = tl.cdiv(seq_len, TILE_N)
    first_tile = 0
    if HAS_WINDOW:  # the query at seq_len - 1 sees keys from seq_len - window on
        first_tile = tl.maximum(seq_len - window, 0) // TILE_N
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles - first_tile, NUM_SPLITS), 1)
    return first_tile, tiles_per_split, num_tiles


@triton.jit
def _decode_split_kernel(
    out_ptr,
    partial_acc_ptr,  # [B, num_heads, NUM_SPLITS, HEAD_PAD] fp32
    partial_max_ptr,  # [B, num_heads, NUM_SPLITS] fp32, log2 units
    partial_sum_ptr,  # [B, num_heads, NUM_SPLITS] fp32
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    new_key_ptr,  # [B, num_kv_heads, head_dim]: this step's keys, when WRITE_NEW_KV
    new_value_ptr,
    slot_mapping_ptr,  # [B] int64, -1 = padding
    scale_log2,
    window,
    block_size,
    num_heads,
    stride_query_token,
    stride_query_head,
    stride_query_dim,
    stride_out_token,
    stride_out_head,
    stride_out_dim,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    stride_table_row,
    stride_new_key_token,
    stride_new_key_head,
    stride_new_key_dim,
    stride_new_value_token,
    stride_new_value_head,
    stride_new_value_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    WRITE_NEW_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + request)
    first_tile, tiles_per_split, num_tiles = _decode_split_range(seq_len, window, TILE_N, NUM_SPLITS, HAS_WINDOW)
    tile_begin = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    if tile_begin >= tile_end:  # a short context: this split has nothing to read
        return

    token = tl.load(query_start_loc_ptr + request).to(tl.int64)
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_DIM
    if WRITE_NEW_KV:
        # The one split whose tiles hold the new token's position caches its K/V, then
        # reads them back with the rest: no separate write kernel. The barrier makes the
        # stores visible to every thread of the program before the tiles are loaded.
        new_tile = (seq_len - 1) // TILE_N
        if (new_tile >= tile_begin) & (new_tile < tile_end):
            _cache_kv_row(
                new_key_ptr + token * stride_new_key_token + kv_head * stride_new_key_head,
                new_value_ptr + token * stride_new_value_token + kv_head * stride_new_value_head,
                stride_new_key_dim,
                stride_new_value_dim,
                key_cache_ptr,
                value_cache_ptr,
                tl.load(slot_mapping_ptr + token),
                kv_head,
                block_size,
                stride_cache_block,
                stride_cache_slot,
                stride_cache_head,
                stride_cache_dim,
                HEAD_DIM,
                HEAD_PAD,
            )
            tl.debug_barrier()

    rows = tl.arange(0, BLOCK_H)  # the query heads of this KV head, padded for tl.dot
    head = kv_head * QUERIES_PER_KV + rows
    row_valid = rows < QUERIES_PER_KV
    io_mask = row_valid[:, None] & dim_valid[None, :]
    query = tl.load(
        query_ptr + token * stride_query_token + head[:, None] * stride_query_head + dims[None, :] * stride_query_dim,
        mask=io_mask,
        other=0.0,
    ).to(key_cache_ptr.dtype.element_ty)
    query_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + (seq_len - 1)
    acc = tl.zeros([BLOCK_H, HEAD_PAD], dtype=tl.float32)
    running_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc, running_max, running_sum = _attend_tiles(
        query,
        query_pos,
        acc,
        running_max,
        running_sum,
        key_cache_ptr,
        value_cache_ptr,
        block_tables_ptr + request.to(tl.int64) * stride_table_row,
        kv_head,
        tile_begin,
        tile_end,
        seq_len,
        scale_log2,
        window,
        block_size,
        stride_cache_block,
        stride_cache_slot,
        stride_cache_head,
        stride_cache_dim,
        HEAD_DIM,
        HEAD_PAD,
        TILE_N,
        HAS_WINDOW,
        DOT_PRECISION,
        DOT_IN_FP32,
    )
    if NUM_SPLITS == 1:  # the whole context in one program: no reduce needed
        result = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(
            out_ptr + token * stride_out_token + head[:, None] * stride_out_head + dims[None, :] * stride_out_dim,
            result.to(out_ptr.dtype.element_ty),
            mask=io_mask,
        )
    else:
        partial_row = (request * num_heads + head).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(partial_max_ptr + partial_row, running_max, mask=row_valid)
        tl.store(partial_sum_ptr + partial_row, running_sum, mask=row_valid)
        tl.store(partial_acc_ptr + partial_row[:, None] * HEAD_PAD + dims[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    window,
    num_heads,
    stride_out_token,
    stride_out_head,
    stride_out_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Merge the splits of one (request, query head): rescale each to the global max."""
    request = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + request)
    first_tile, tiles_per_split, num_tiles = _decode_split_range(seq_len, window, TILE_N, NUM_SPLITS, HAS_WINDOW)
    num_active = tl.cdiv(num_tiles - first_tile, tiles_per_split)  # splits that wrote partials
    splits = tl.arange(0, SPLITS_PAD)
    active = splits < num_active
    partial_row = (request * num_heads + head).to(tl.int64) * NUM_SPLITS + splits  # [SPLITS_PAD]
    split_max = tl.load(partial_max_ptr + partial_row, mask=active, other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + partial_row, mask=active, other=0.0)
    global_max = tl.max(split_max, 0)
    shift = tl.where(global_max > float("-inf"), global_max, 0.0)
    weight = tl.exp2(split_max - shift)  # [SPLITS_PAD], 0 for inactive splits
    total = tl.sum(split_sum * weight, 0)
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_DIM
    split_acc = tl.load(
        partial_acc_ptr + partial_row[:, None] * HEAD_PAD + dims[None, :], mask=active[:, None], other=0.0
    )  # [SPLITS_PAD, HEAD_PAD]
    result = tl.sum(split_acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    token = tl.load(query_start_loc_ptr + request).to(tl.int64)
    tl.store(
        out_ptr + token * stride_out_token + head * stride_out_head + dims * stride_out_dim,
        result.to(out_ptr.dtype.element_ty),
        mask=dim_valid,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_num_splits(
    num_requests: int, num_kv_heads: int, max_blocks_per_seq: int, block_size: int, device: torch.device
) -> int:
    """How many programs share one request's context, from shapes alone (capture-safe).

    Enough splits that B * KV heads * splits fills the GPU, but no more than the
    longest possible context has (largest) tiles.
    """
    target_programs = DECODE_PROGRAMS_PER_SM * _sm_count(device)
    wanted = math.ceil(target_programs / (num_requests * num_kv_heads))
    max_tiles = math.ceil(max_blocks_per_seq * block_size / DECODE_TILE_KEYS)
    return max(1, min(wanted, MAX_DECODE_SPLITS, max_tiles))


def empty_decode_scratch(
    num_requests: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 scratch of the split decode, uninitialized: (partial acc, max, sum)."""
    stats = (num_requests, num_heads, num_splits)
    return (
        torch.empty(*stats, padded_head_dim(head_dim), dtype=torch.float32, device=device),
        torch.empty(stats, dtype=torch.float32, device=device),
        torch.empty(stats, dtype=torch.float32, device=device),
    )


def split_decode_attention(
    query: torch.Tensor,  # [B, num_heads, head_dim]: one query token per request
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out: torch.Tensor,  # [B, num_heads, head_dim], written in place
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [B] int32, including this step's token
    query_start_loc: torch.Tensor,  # [B + 1] int32
    scale: float,
    sliding_window: int | None,
    partial_acc: torch.Tensor,  # fp32, empty_decode_scratch(...)[0]
    partial_max: torch.Tensor,  # fp32, empty_decode_scratch(...)[1]
    partial_sum: torch.Tensor,  # fp32, empty_decode_scratch(...)[2]
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # (key, value, slot_mapping)
) -> None:
    """Flash-decoding; the number of splits is partial_max.shape[2] (see decode_num_splits).

    With ``new_kv`` ([B, num_kv_heads, head_dim] keys and values, [B] slots) the kernel
    also caches this step's K/V (``write_kv_cache`` in the same launch); without it they
    must be cached already."""
    num_requests, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    num_splits = partial_max.shape[2]
    if num_requests == 0:
        return
    queries_per_kv = num_heads // num_kv_heads
    head_pad = padded_head_dim(head_dim)
    tile_keys = _tile_keys(DECODE_TILE_KEYS, head_dim, key_cache.dtype)
    window, has_window = _window_args(sliding_window)
    # Without new K/V the kernel never reads these: any tensors of the right rank do.
    new_key, new_value, slot_mapping = new_kv if new_kv is not None else (query, query, seq_lens)
    _decode_split_kernel[(num_requests, num_kv_heads, num_splits)](
        out,
        partial_acc,
        partial_max,
        partial_sum,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        new_key,
        new_value,
        slot_mapping,
        scale * LOG2E,
        window,
        key_cache.shape[1],
        num_heads,
        *query.stride(),
        *out.stride(),
        *key_cache.stride(),
        block_tables.stride(0),
        *new_key.stride(),
        *new_value.stride(),
        HEAD_DIM=head_dim,
        HEAD_PAD=head_pad,
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_H=max(MIN_DOT_DIM, triton.next_power_of_2(queries_per_kv)),
        TILE_N=tile_keys,
        NUM_SPLITS=num_splits,
        HAS_WINDOW=has_window,
        WRITE_NEW_KV=new_kv is not None,
        DOT_PRECISION=_dot_precision(key_cache.dtype),
        DOT_IN_FP32=_dot_in_fp32(key_cache.dtype),
        num_warps=DECODE_NUM_WARPS,
        num_stages=DECODE_NUM_STAGES,
    )
    if num_splits == 1:  # the split kernel wrote out directly
        return
    _decode_reduce_kernel[(num_requests, num_heads)](
        out,
        partial_acc,
        partial_max,
        partial_sum,
        seq_lens,
        query_start_loc,
        window,
        num_heads,
        *out.stride(),
        HEAD_DIM=head_dim,
        HEAD_PAD=head_pad,
        TILE_N=tile_keys,
        NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        HAS_WINDOW=has_window,
        num_warps=REDUCE_NUM_WARPS,
    )
