"""Weight-only INT4 / INT8 GEMMs in Triton: ``x @ dequantize(qweight).T + bias``, weights unpacked in registers.

The weight stays packed in memory (int_pack.py's layout, here transposed to [N, K / pack]
so each output row's words are contiguous): a program loads int32 words and takes value
``j`` of each with a shift and a mask. The value becomes a float without a conversion
instruction: OR-ed into the mantissa of 2**23 (``MAGIC``) it reads as ``2**23 + q``, and
subtracting ``2**23 + zero`` leaves ``q - zero`` exactly. Scales are applied once per
(group, output) to a partial sum wherever a tile's inputs share a group.

Two kernels:
- GEMV, one-row steps (batch-1 decode): program (n, s) reduces BLOCK_N outputs over the
  s-th K slice on the CUDA cores; no tensor cores (a decode row does too little math).
- GEMM with ``tl.dot``, 16 rows per tile and up: one dot per value position j of the
  words (its activations are the columns j, j + pack, ... of the tile).
Both split K over programs when a layer has too few output tiles to fill the GPU
(``split_count``): each slice writes float32 partial sums, the last slice of an output
tile to finish (a per-tile counter) adds them in order, adds the bias, writes the output
and resets the counter, so one launch does it all, CUDA-graph replays included.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fxllm.models.quantization.int_gemm import MIN_DOT, SMALL_STEP_MAX_ROWS
from fxllm.models.quantization.int_pack import pack_factor

# 2**23 as float32 bits: a value below 2**23 OR-ed into its mantissa reads as 2**23 + value.
MAGIC_BITS = tl.constexpr(0x4B000000)
MAGIC = tl.constexpr(8388608.0)
# Steps of at most this many rows take the GEMV kernel.
GEMV_MAX_ROWS = 1
# Split K until about this many programs per SM run (weight loads in flight hide latency).
PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class GemvTile:
    """GEMV launch shape: output rows per program, inputs per loop step, warps, pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Starting points chosen by reasoning, not yet measured on a GPU: the GEMV reads long
# contiguous stretches of each output row's words (as fxllm's FP8 GEMV does), the GEMMs use
# the usual Hopper tiles. tools/bench_int_gemm.py times them against bf16 (--sweep-gemv
# tries other GEMV tiles).
DEFAULT_GEMV_TILE = GemvTile(block_n=4, block_k=1024, num_warps=4, num_stages=3)
SMALL_STEP_TILE = GemmTile(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
LARGE_STEP_TILE = GemmTile(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3)
# The interpreter (CPU tests) runs small tiles: its time grows with the tile.
INTERPRETER_GEMV_TILE = GemvTile(block_n=16, block_k=64, num_warps=1, num_stages=1)
INTERPRETER_GEMM_TILE = GemmTile(block_m=16, block_n=32, block_k=128, num_warps=1, num_stages=1)


@triton.jit
def _values(words, j: tl.constexpr, BITS: tl.constexpr):
    """Value j of each int32 word, as float32 2**23 + value (exact)."""
    bits = ((words >> (j * BITS)) & ((1 << BITS) - 1)) | MAGIC_BITS
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(x, weight_t, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + x @ weight_t for x [BLOCK_M, D] and weight_t [D, BLOCK_N] in the model dtype."""
    if DOT_IN_FP32:
        return tl.dot(x.to(tl.float32), weight_t.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, weight_t, acc, input_precision=DOT_PRECISION)


@triton.jit
def _finish_tile(
    acc, offsets, mask, cols, col_valid, bias_ptr, out_ptr, partial_ptr, counter_ptr, split, num_splits,
    partial_stride, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
):
    """Write an output tile: directly, or, split over K, as this slice's partial sums; the last
    slice to finish adds all of them in slice order and resets the tile's counter."""
    if SPLIT:
        tl.store(partial_ptr + split * partial_stride + offsets, acc, mask=mask)
        # Every thread's stores before the count; acq_rel: this slice's partials are visible
        # before its count, the other slices' after.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1)
        if arrived == num_splits - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for other in range(num_splits):
                # .cg: read from L2, where the other SMs' stores are.
                total += tl.load(partial_ptr + other * partial_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_splits"])
def _int_gemv_kernel(
    x_ptr,  # [K]
    qweight_ptr,  # [N, K / PACK] int32
    scales_ptr,  # [groups, N]
    zeros_ptr,  # [groups, N] (HAS_ZEROS)
    bias_ptr,
    out_ptr,  # [N]
    partial_ptr,  # [splits, N] float32 (SPLIT)
    counters_ptr,  # [cdiv(N, BLOCK_N)] int32, zero between calls (SPLIT)
    num_splits,
    N: tl.constexpr,
    K: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    GROUP_K: tl.constexpr,  # inputs of a K step that share a scale: min(BLOCK_K, GROUP)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (n, s): BLOCK_N outputs over inputs s * K_PER_SPLIT ... A K step holds
    TILE_GROUPS groups of GROUP_WORDS words per output row ([BLOCK_N, TILE_GROUPS,
    GROUP_WORDS] tiles), so each (group, output) scale is loaded and applied once."""
    PACK: tl.constexpr = 32 // BITS
    GROUP_WORDS: tl.constexpr = GROUP_K // PACK
    TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP_K
    WORDS_PER_ROW: tl.constexpr = K // PACK
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    tile_groups = tl.arange(0, TILE_GROUPS)
    group_words = tl.arange(0, GROUP_WORDS)
    word_in_step = tile_groups[:, None] * GROUP_WORDS + group_words[None, :]  # [TILE_GROUPS, GROUP_WORDS]
    acc = tl.zeros((BLOCK_N, TILE_GROUPS, GROUP_WORDS), dtype=tl.float32)
    k_first = split * K_PER_SPLIT
    for k_start in range(k_first, k_first + K_PER_SPLIT, BLOCK_K):
        words = k_start // PACK + word_in_step  # [TILE_GROUPS, GROUP_WORDS]
        word_valid = words < WORDS_PER_ROW
        packed = tl.load(
            qweight_ptr + cols[:, None, None] * WORDS_PER_ROW + words[None, :, :],
            mask=col_valid[:, None, None] & word_valid[None, :, :],
            other=0,
        )
        groups = (k_start + tile_groups * GROUP_K) // GROUP  # [TILE_GROUPS]
        scale_offsets = groups[None, :] * N + cols[:, None]  # [BLOCK_N, TILE_GROUPS]
        scale_mask = col_valid[:, None] & (groups[None, :] * GROUP < K)
        scale = tl.load(scales_ptr + scale_offsets, mask=scale_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            shift = MAGIC + tl.load(zeros_ptr + scale_offsets, mask=scale_mask, other=0.0).to(tl.float32)
        else:
            shift = tl.full((BLOCK_N, TILE_GROUPS), MAGIC + (1 << (BITS - 1)), dtype=tl.float32)
        step = tl.zeros((BLOCK_N, TILE_GROUPS, GROUP_WORDS), dtype=tl.float32)
        for j in tl.static_range(PACK):
            ks = words * PACK + j
            x = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)  # [TILE_GROUPS, GROUP_WORDS]
            step += (_values(packed, j, BITS) - shift[:, :, None]) * x[None, :, :]
        acc += step * scale[:, :, None]
    total = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BLOCK_N]
    _finish_tile(
        total, cols, col_valid, cols, col_valid, bias_ptr, out_ptr, partial_ptr, counters_ptr + pid_n, split,
        num_splits, N, HAS_BIAS, SPLIT,
    )


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _int_gemm_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [N, K / PACK] int32
    scales_ptr,  # [groups, N]
    zeros_ptr,
    bias_ptr,
    out_ptr,  # [M, N]
    partial_ptr,  # [splits, M, N] float32 (SPLIT)
    counters_ptr,  # int32, one per output tile, zero between calls (SPLIT)
    num_tokens,
    num_splits,
    stride_x_token,
    N: tl.constexpr,
    K: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    ONE_GROUP_PER_STEP: tl.constexpr,  # every K step lies in one group
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (m, n, s): a [BLOCK_M, BLOCK_N] output tile over the s-th K slice. Where a K
    step lies in one group, the dots multiply exact integers (q - zero) and the scale is
    applied to their sum; otherwise each weight is scaled (and rounded to the model dtype)
    before its dot."""
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    WORDS_PER_ROW: tl.constexpr = K // PACK
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < num_tokens
    col_valid = cols < N
    word_offsets = tl.arange(0, WORDS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = split * K_PER_SPLIT
    for k_start in range(k_first, k_first + K_PER_SPLIT, BLOCK_K):
        words = k_start // PACK + word_offsets  # [WORDS]
        word_valid = words < WORDS_PER_ROW
        packed = tl.load(
            qweight_ptr + words[:, None] + cols[None, :] * WORDS_PER_ROW,
            mask=word_valid[:, None] & col_valid[None, :],
            other=0,
        )  # [WORDS, BLOCK_N]: the weight tile transposed, as the dot takes it
        if ONE_GROUP_PER_STEP:
            group = k_start // GROUP
            group_mask = col_valid & (k_start < K)
            scale = tl.load(scales_ptr + group * N + cols, mask=group_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                shift = MAGIC + tl.load(zeros_ptr + group * N + cols, mask=group_mask, other=0.0).to(tl.float32)
            else:
                shift = tl.full((BLOCK_N,), MAGIC + (1 << (BITS - 1)), dtype=tl.float32)
            step = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PACK):
                ks = words * PACK + j
                x = tl.load(
                    x_ptr + rows[:, None] * stride_x_token + ks[None, :],
                    mask=row_valid[:, None] & (ks < K)[None, :],
                    other=0.0,
                )
                weight_t = (_values(packed, j, BITS) - shift[None, :]).to(x.dtype)  # integers: exact
                step = _dot(x, weight_t, step, DOT_PRECISION, DOT_IN_FP32)
            acc += step * scale[None, :]
        else:
            groups = (words * PACK) // GROUP  # [WORDS]: every value of a word is in its group
            offsets = groups[:, None] * N + cols[None, :]
            mask = word_valid[:, None] & col_valid[None, :]
            scale = tl.load(scales_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                shift = MAGIC + tl.load(zeros_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            else:
                shift = tl.full((WORDS, BLOCK_N), MAGIC + (1 << (BITS - 1)), dtype=tl.float32)
            for j in tl.static_range(PACK):
                ks = words * PACK + j
                x = tl.load(
                    x_ptr + rows[:, None] * stride_x_token + ks[None, :],
                    mask=row_valid[:, None] & (ks < K)[None, :],
                    other=0.0,
                )
                weight_t = ((_values(packed, j, BITS) - shift) * scale).to(x.dtype)
                acc = _dot(x, weight_t, acc, DOT_PRECISION, DOT_IN_FP32)
    offsets = rows[:, None] * N + cols[None, :]
    mask = row_valid[:, None] & col_valid[None, :]
    counter = counters_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
    _finish_tile(
        acc, offsets, mask, cols[None, :], col_valid[None, :], bias_ptr, out_ptr, partial_ptr, counter, split,
        num_splits, num_tokens * N, HAS_BIAS, SPLIT,
    )


@functools.lru_cache(maxsize=None)  # asked per launch; a device's SM count never changes
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def split_count(tiles: int, in_features: int, block_k: int, num_sms: int) -> tuple[int, int]:
    """(splits, inputs per split): K cut into whole steps until tiles * splits fills
    PROGRAMS_PER_SM programs per SM."""
    steps = triton.cdiv(in_features, block_k)
    wanted = max(1, min(steps, triton.cdiv(PROGRAMS_PER_SM * num_sms, tiles)))
    steps_per_split = triton.cdiv(steps, wanted)
    return triton.cdiv(steps, steps_per_split), steps_per_split * block_k


def int_weight_gemm(
    x: torch.Tensor,  # [M, K] float32 / float16 / bfloat16
    qweight: torch.Tensor,  # [N, K / pack] int32
    scales: torch.Tensor,  # [groups, N]
    zeros: torch.Tensor | None,  # [groups, N], None: symmetric
    bias: torch.Tensor | None,  # [N]
    counters: torch.Tensor,  # int32 [counters_needed(N)], zero
    bits: int,
    group_size: int,
    gemv: bool | None = None,  # None: the GEMV kernel for up to GEMV_MAX_ROWS rows (tools compare both)
    gemv_tile: GemvTile | None = None,
) -> torch.Tensor:
    num_tokens, in_features = x.shape
    out_features = qweight.shape[0]
    if in_features % pack_factor(bits) or qweight.shape[1] * pack_factor(bits) != in_features:
        raise ValueError(f"{bits}-bit weight of shape {tuple(qweight.shape)} does not pack {in_features} inputs")
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    x = x.contiguous()
    interpret = triton.knobs.runtime.interpret
    num_sms = _sm_count(x.device)
    common = dict(
        N=out_features, K=in_features, BITS=bits, GROUP=group_size, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
    )
    placeholder = scales  # stands in for absent tensors, never read
    use_gemv = num_tokens <= GEMV_MAX_ROWS if gemv is None else gemv
    if use_gemv:
        if num_tokens != 1:
            raise ValueError(f"the INT GEMV kernel takes one row, got {num_tokens}")
        tile = INTERPRETER_GEMV_TILE if interpret else (gemv_tile or DEFAULT_GEMV_TILE)
        block_k = min(tile.block_k, triton.next_power_of_2(in_features))
        tiles = triton.cdiv(out_features, tile.block_n)
        splits, per_split = split_count(tiles, in_features, block_k, num_sms)
        partial = torch.empty(splits, out_features, dtype=torch.float32, device=x.device) if splits > 1 else out
        launch = {} if interpret else {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
        _int_gemv_kernel[(tiles, splits)](
            x, qweight, scales, zeros if zeros is not None else placeholder, bias if bias is not None else placeholder,
            out, partial, counters, splits, **common, K_PER_SPLIT=per_split, SPLIT=splits > 1,
            GROUP_K=block_k if group_size >= in_features else min(block_k, group_size), BLOCK_N=tile.block_n, BLOCK_K=block_k, **launch,
        )
        return out
    if interpret:
        tile = INTERPRETER_GEMM_TILE
    else:
        tile = SMALL_STEP_TILE if num_tokens <= SMALL_STEP_MAX_ROWS else LARGE_STEP_TILE
    # A step deep enough for a 16-word dot per value position.
    block_k = max(tile.block_k, MIN_DOT * pack_factor(bits))
    row_tiles, col_tiles = triton.cdiv(num_tokens, tile.block_m), triton.cdiv(out_features, tile.block_n)
    # Only steps of one row tile split: their counters are sized for it.
    splits, per_split = (1, triton.cdiv(in_features, block_k) * block_k)
    if num_tokens <= SMALL_STEP_MAX_ROWS:
        splits, per_split = split_count(row_tiles * col_tiles, in_features, block_k, num_sms)
    partial = torch.empty(splits, num_tokens, out_features, dtype=torch.float32, device=x.device) if splits > 1 else out
    launch = {} if interpret else {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
    _int_gemm_kernel[(row_tiles, col_tiles, splits)](
        x, qweight, scales, zeros if zeros is not None else placeholder, bias if bias is not None else placeholder,
        out, partial, counters, num_tokens, splits, x.stride(0), **common, K_PER_SPLIT=per_split, SPLIT=splits > 1,
        # float32 models keep float32 products, as the reference matmul does (not TF32).
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bf16 tiles as raw 16-bit integers; widening first is exact.
        DOT_IN_FP32=interpret and x.dtype == torch.bfloat16,
        ONE_GROUP_PER_STEP=group_size >= in_features or group_size % block_k == 0,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, **launch,
    )
    return out
