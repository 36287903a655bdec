"""The experts on the GPU: a grouped GEMM over the step's entries sorted by expert (Triton).

``triton_routing.sort_by_expert`` lays the (token, slot) entries out in blocks of
``block_m`` rows that each belong to one expert. Then two kernels, each with a program per
(block, column tile), where blocks past the rows in use return at once:
1. gate/up: a block's token rows times its expert's gate and up rows (two accumulators over
   the hidden dim), SiLU(gate) * up in float32, written to the entries' rows of ``act`` [T*top_k, I];
2. down: those rows of ``act`` times the expert's down projection, scaled by the entries'
   routing weights, written to ``partial`` [T*top_k, H].
The top_k partial outputs of each token are summed last. No host sync and no data-dependent
size anywhere (docs/ARCHITECTURE.md, contract 10), so a FULL CUDA graph holds the whole layer. FP8 experts'
weight tiles widen to the activation dtype in registers (exactly) and each finished column
is multiplied by its row's scale: one byte read per weight.

Tiles depend on how many rows each expert gets on average: decode steps give most experts
a row or none, and a 16-row block wastes the least; large prefill steps fill wider blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fxllm.models.moe.triton_routing import sort_by_expert


@dataclass(frozen=True)
class ExpertTile:
    """Launch shape of the grouped GEMMs: rows per block (the sort's padding too), columns and
    reduction width per program, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Up to about a block's worth of rows per expert (decode): 16-row blocks (tl.dot's least), narrow
# column tiles so that few experts still spread over many programs, long K steps to keep many
# weight bytes in flight.
SMALL_TILE = ExpertTile(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)
MEDIUM_TILE = ExpertTile(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
LARGE_TILE = ExpertTile(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
# Mean rows per expert up to which each tile serves; LARGE_TILE beyond.
SMALL_TILE_MAX_ROWS = 16
MEDIUM_TILE_MAX_ROWS = 48
# The interpreter (CPU tests) runs small tiles: its cost is per element.
INTERPRETER_TILE = ExpertTile(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)


def expert_tile(num_entries: int, num_experts: int) -> ExpertTile:
    """The tile for ``num_entries`` (token, slot) entries over ``num_experts`` experts."""
    if triton.knobs.runtime.interpret:
        return INTERPRETER_TILE
    mean_rows = num_entries / num_experts
    if mean_rows <= SMALL_TILE_MAX_ROWS:
        return SMALL_TILE
    return MEDIUM_TILE if mean_rows <= MEDIUM_TILE_MAX_ROWS else LARGE_TILE


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + a @ b.T for a [BLOCK_M, BLOCK_K] and b [BLOCK_N, BLOCK_K]."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["num_entries"])
def _gate_up_kernel(
    hidden_ptr,
    w13_ptr,
    w13_scale_ptr,
    act_ptr,
    sorted_entries_ptr,
    block_experts_ptr,
    num_rows_ptr,
    num_entries,
    stride_hidden_token,
    stride_w13_expert,
    stride_w13_row,
    stride_w13_scale_expert,
    stride_act_entry,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    TOP_K: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_rows_ptr):
        return
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    entries = tl.load(sorted_entries_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_valid = entries < num_entries
    tokens = (entries // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < INTERMEDIATE
    gate_rows = w13_ptr + expert * stride_w13_expert + cols[:, None] * stride_w13_row  # [BLOCK_N, 1]
    up_rows = gate_rows + INTERMEDIATE * stride_w13_row
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, HIDDEN, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < HIDDEN
        x = tl.load(
            hidden_ptr + tokens[:, None] * stride_hidden_token + ks[None, :],
            mask=row_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        weight_mask = col_valid[:, None] & k_valid[None, :]
        gate_weight = tl.load(gate_rows + ks[None, :], mask=weight_mask, other=0.0).to(x.dtype)
        up_weight = tl.load(up_rows + ks[None, :], mask=weight_mask, other=0.0).to(x.dtype)
        gate = _dot(x, gate_weight, gate, DOT_PRECISION, DOT_IN_FP32)
        up = _dot(x, up_weight, up, DOT_PRECISION, DOT_IN_FP32)
    if HAS_SCALES:
        scales = w13_scale_ptr + expert * stride_w13_scale_expert + cols  # [BLOCK_N]
        gate *= tl.load(scales, mask=col_valid, other=0.0)[None, :]
        up *= tl.load(scales + INTERMEDIATE, mask=col_valid, other=0.0)[None, :]
    act = gate / (1.0 + tl.exp(-gate)) * up  # SiLU(gate) * up
    tl.store(
        act_ptr + entries[:, None].to(tl.int64) * stride_act_entry + cols[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )


@triton.jit(do_not_specialize=["num_entries"])
def _down_kernel(
    act_ptr,
    w2_ptr,
    w2_scale_ptr,
    weights_ptr,
    partial_ptr,
    sorted_entries_ptr,
    block_experts_ptr,
    num_rows_ptr,
    num_entries,
    stride_act_entry,
    stride_w2_expert,
    stride_w2_row,
    stride_w2_scale_expert,
    stride_partial_entry,
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_rows_ptr):
        return
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    entries = tl.load(sorted_entries_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_valid = entries < num_entries
    act_rows = act_ptr + entries[:, None].to(tl.int64) * stride_act_entry  # [BLOCK_M, 1]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < HIDDEN
    weight_rows = w2_ptr + expert * stride_w2_expert + cols[:, None] * stride_w2_row  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, INTERMEDIATE, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < INTERMEDIATE
        act = tl.load(act_rows + ks[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        weight = tl.load(weight_rows + ks[None, :], mask=col_valid[:, None] & k_valid[None, :], other=0.0)
        acc = _dot(act, weight.to(act.dtype), acc, DOT_PRECISION, DOT_IN_FP32)
    if HAS_SCALES:
        acc *= tl.load(w2_scale_ptr + expert * stride_w2_scale_expert + cols, mask=col_valid, other=0.0)[None, :]
    acc *= tl.load(weights_ptr + entries, mask=row_valid, other=0.0)[:, None]
    tl.store(
        partial_ptr + entries[:, None].to(tl.int64) * stride_partial_entry + cols[None, :],
        acc.to(partial_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )


def triton_fused_moe(
    hidden: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    top_k: int,
    renormalize: bool,
    w13_scale: torch.Tensor | None = None,  # [E, 2I] float32 where w13 is FP8
    w2_scale: torch.Tensor | None = None,  # [E, H] float32 where w2 is FP8
    tile: ExpertTile | None = None,  # None: expert_tile's choice (tools compare others)
) -> torch.Tensor:
    num_tokens, hidden_size = hidden.shape
    num_experts, _, intermediate = w2.shape
    if num_tokens == 0:
        return hidden.new_empty(hidden.shape)
    hidden = hidden.contiguous()  # the kernels step along the last dims one element at a time
    w13, w2 = w13.contiguous(), w2.contiguous()
    num_entries = num_tokens * top_k
    tile = tile or expert_tile(num_entries, num_experts)
    sort = sort_by_expert(router_logits, top_k, renormalize, tile.block_m)
    act = hidden.new_empty(num_entries, intermediate)
    partial = hidden.new_empty(num_entries, hidden_size)
    common = dict(
        HIDDEN=hidden_size,
        INTERMEDIATE=intermediate,
        # float32 models keep float32 products, as the reference matmul does (not TF32).
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bf16 tiles as raw 16-bit integers; widening first is
        # exact (a product of two bf16 fits float32).
        DOT_IN_FP32=triton.knobs.runtime.interpret and hidden.dtype == torch.bfloat16,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
    )
    launch = {} if triton.knobs.runtime.interpret else dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
    has_scales = w13_scale is not None
    if has_scales:
        w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
    else:  # never read without HAS_SCALES
        w13_scale, w2_scale = w13, w2
    _gate_up_kernel[(sort.max_blocks, triton.cdiv(intermediate, tile.block_n))](
        hidden, w13, w13_scale, act, sort.sorted_entries, sort.block_experts, sort.num_rows, num_entries,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), act.stride(0),
        TOP_K=top_k, HAS_SCALES=has_scales, **common, **launch,
    )
    _down_kernel[(sort.max_blocks, triton.cdiv(hidden_size, tile.block_n))](
        act, w2, w2_scale, sort.weights, partial, sort.sorted_entries, sort.block_experts, sort.num_rows, num_entries,
        act.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), partial.stride(0),
        HAS_SCALES=has_scales, **common, **launch,
    )
    return partial.view(num_tokens, top_k, hidden_size).sum(dim=1)
