"""Weight-only FP8 GEMM in Triton: ``x @ (weight * scale).T + bias`` with weights dequantized in registers.

Program (m, n) owns a [BLOCK_M, BLOCK_N] tile of the output and walks K: it loads an
activation tile in the model dtype and an FP8 weight tile (one byte per weight, the
point for memory-bound small steps), multiplies the weight by the scale of each
element's (row // SCALE_BLOCK_N, col // SCALE_BLOCK_K) cell, rounds it to the model
dtype as the dequantize reference does, and accumulates the dot in float32.

Tile sizes are a first guess: not yet tuned or run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tl.dot needs at least 16 rows; decode steps (M <= 16) fill one row tile.
BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _fp8_weight_only_gemm_kernel(
    x_ptr,
    weight_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    num_tokens,
    stride_x_token,
    stride_x_k,
    stride_weight_n,
    stride_weight_k,
    stride_scale_n,
    stride_scale_k,
    stride_out_token,
    stride_out_n,
    N: tl.constexpr,
    K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < num_tokens
    col_valid = cols < N
    scale_rows = scale_ptr + (cols // SCALE_BLOCK_N)[:, None] * stride_scale_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_x_token + ks[None, :] * stride_x_k,
            mask=row_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        weight_mask = col_valid[:, None] & k_valid[None, :]
        weight = tl.load(
            weight_ptr + cols[:, None] * stride_weight_n + ks[None, :] * stride_weight_k, mask=weight_mask, other=0.0
        )
        scale = tl.load(scale_rows + (ks // SCALE_BLOCK_K)[None, :] * stride_scale_k, mask=weight_mask, other=0.0)
        dequantized = (weight.to(tl.float32) * scale).to(x.dtype)  # [BLOCK_N, BLOCK_K]
        if DOT_IN_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(dequantized.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(dequantized), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_out_token + cols[None, :] * stride_out_n,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )


def fp8_weight_only_gemm(
    x: torch.Tensor,  # [M, K] float32 / float16 / bfloat16
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [ceil(N / block_n), ceil(K / block_k)] float32
    bias: torch.Tensor | None,  # [N]
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    num_tokens, in_features = x.shape
    out_features = weight.shape[0]
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    grid = (triton.cdiv(num_tokens, BLOCK_M), triton.cdiv(out_features, BLOCK_N))
    _fp8_weight_only_gemm_kernel[grid](
        x,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,  # never read without HAS_BIAS
        out,
        num_tokens,
        *x.stride(),
        *weight.stride(),
        *weight_scale.stride(),
        *out.stride(),
        N=out_features,
        K=in_features,
        SCALE_BLOCK_N=block_n,
        SCALE_BLOCK_K=block_k,
        HAS_BIAS=bias is not None,
        # float32 models keep float32 products, as the reference matmul does (not TF32).
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bf16 tiles as raw 16-bit integers; widening
        # first is exact (a product of two bf16 fits float32).
        DOT_IN_FP32=triton.knobs.runtime.interpret and x.dtype == torch.bfloat16,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return out
