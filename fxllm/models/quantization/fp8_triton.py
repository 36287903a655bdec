"""Weight-only FP8 GEMM in Triton: ``x @ (weight * scale).T + bias`` with weights dequantized in registers.

Program (m, n) owns a [BLOCK_M, BLOCK_N] tile of the output and walks K: it loads an
activation tile in the model dtype and an FP8 weight tile (one byte per weight, the
point for memory-bound small steps), widens the weights to the model dtype (exact) and
accumulates the dot in float32. Scales are applied as coarsely as their layout allows:
per-channel scales once to the finished row, block scales whose K-extent is a multiple
of the tile to each tile's partial product, and any other layout per element (rounded
to the model dtype as the dequantize reference rounds).

A GEMV kernel serves one-row steps (batch-1 decode) where ``GEMV_MAX_ROWS`` says so: a
dot tile has at least 16 rows, and narrow output tiles without one give narrow layers
more programs, hence more weight bytes in flight.

GEMM tiles are autotuned per (row bucket, N, K): the first step of each bucket
benchmarks the configs below, which the CUDA-graph warm-ups do before any capture. The
GEMV runs one tile, chosen with weights streaming from HBM (``DEFAULT_GEMV_TILE``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# tl.dot needs at least 16 rows; decode steps (M <= 16) fill one row tile.
MIN_BLOCK_M = 16
# Steps are tuned per power-of-two row count up to this; larger steps share its tiles.
LARGEST_ROW_BUCKET = 256
# Small steps read weights and little else: narrow N tiles spread them over every SM,
# long K tiles keep many loads in flight. Larger steps reuse each weight tile across rows.
_SMALL_STEP_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4, num_stages=stages)
    for block_n in (16, 32, 64)
    for block_k in (128, 256)
    for stages in (4,)
]
_LARGE_STEP_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64}, num_warps=warps, num_stages=3)
    for block_m, block_n, warps in ((32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 128, 8))
]
# The interpreter (CPU tests) runs one fixed tile: tuning there would only cost time.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
# Steps of at most this many rows take the GEMV kernel: no 16-row dot tile, so output
# tiles of a few rows spread even narrow layers over every SM. On an H100 it took a
# Llama-3-8B layer's four GEMMs at one row from 104.7 to 79.8 µs (tools/bench_fp8_gemm.py,
# BENCHMARKS.md); it was not measured at more rows.
GEMV_MAX_ROWS = 1


@dataclass(frozen=True)
class GemvTile:
    """Launch shape of the GEMV kernel: outputs per program, K per load, warps, pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# One tile for every layer, chosen with weights streaming from HBM as in a decode step
# (tools/bench_fp8_gemm.py --sweep-gemv cycles through more weight copies than L2 holds).
# On an H100, in one streaming run, it took a Llama-3-8B layer's four GEMVs from 90.7 µs
# (Triton's autotuner, which times each layer alone, warm in L2) to 83.7 µs
# (BENCHMARKS.md); wide loads along K keep enough bytes in flight.
DEFAULT_GEMV_TILE = GemvTile(block_n=4, block_k=2048, num_warps=4, num_stages=3)
INTERPRETER_GEMV_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64}


def _prune_configs(configs, named_args, **kwargs):
    small = named_args["row_bucket"] <= MIN_BLOCK_M
    return [c for c in configs if (c.kwargs["BLOCK_M"] == MIN_BLOCK_M) == small]


@triton.jit
def _dot(x, weight, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + x @ weight.T for x [BLOCK_M, BLOCK_K] and weight [BLOCK_N, BLOCK_K] in the model dtype."""
    if DOT_IN_FP32:
        return tl.dot(x.to(tl.float32), tl.trans(weight.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(weight), acc, input_precision=DOT_PRECISION)


@triton.jit
def _fp8_weight_only_gemm_kernel(
    x_ptr,
    weight_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    num_tokens,
    row_bucket,  # the autotuning key: next power of two of num_tokens, capped
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
    scale_rows = scale_ptr + (cols // SCALE_BLOCK_N) * stride_scale_n  # [BLOCK_N]
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
        if SCALE_BLOCK_K >= K:
            # One scale per output row: FP8 widens exactly to the model dtype, scale once at the end.
            acc = _dot(x, weight.to(x.dtype), acc, DOT_PRECISION, DOT_IN_FP32)
        elif SCALE_BLOCK_K % BLOCK_K == 0:
            # The tile lies in one scale column: scale its partial product per output row.
            scale = tl.load(scale_rows + (k_start // SCALE_BLOCK_K) * stride_scale_k, mask=col_valid, other=0.0)
            partial = _dot(x, weight.to(x.dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, DOT_IN_FP32)
            acc += partial * scale[None, :]
        else:
            # Blocks not aligned to the tile: a scale per element, rounded as the reference rounds.
            scale = tl.load(scale_rows[:, None] + (ks // SCALE_BLOCK_K)[None, :] * stride_scale_k, mask=weight_mask, other=0.0)
            acc = _dot(x, (weight.to(tl.float32) * scale).to(x.dtype), acc, DOT_PRECISION, DOT_IN_FP32)
    if SCALE_BLOCK_K >= K:
        acc *= tl.load(scale_rows, mask=col_valid, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_out_token + cols[None, :] * stride_out_n,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    weight_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    stride_x_k,
    stride_weight_n,
    stride_weight_k,
    stride_scale_n,
    stride_scale_k,
    N: tl.constexpr,
    K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row: program n owns BLOCK_N outputs and reduces them over K in float32 on the
    CUDA cores (a decode row does too little math to need tensor cores). Scales as in the
    GEMM kernel: per channel once at the end, aligned blocks per tile, else per element."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    scale_rows = scale_ptr + (cols // SCALE_BLOCK_N) * stride_scale_n  # [BLOCK_N]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < K
        x = tl.load(x_ptr + ks * stride_x_k, mask=k_valid, other=0.0)
        weight_mask = col_valid[:, None] & k_valid[None, :]
        weight = tl.load(
            weight_ptr + cols[:, None] * stride_weight_n + ks[None, :] * stride_weight_k, mask=weight_mask, other=0.0
        ).to(tl.float32)
        if SCALE_BLOCK_K >= K:
            acc += tl.sum(weight * x.to(tl.float32)[None, :], axis=1)
        elif SCALE_BLOCK_K % BLOCK_K == 0:
            scale = tl.load(scale_rows + (k_start // SCALE_BLOCK_K) * stride_scale_k, mask=col_valid, other=0.0)
            acc += tl.sum(weight * x.to(tl.float32)[None, :], axis=1) * scale
        else:
            scale = tl.load(scale_rows[:, None] + (ks // SCALE_BLOCK_K)[None, :] * stride_scale_k, mask=weight_mask, other=0.0)
            # Rounded to the model dtype per element, as the dequantize reference rounds.
            dequantized = (weight * scale).to(x.dtype).to(tl.float32)
            acc += tl.sum(dequantized * x.to(tl.float32)[None, :], axis=1)
    if SCALE_BLOCK_K >= K:
        acc *= tl.load(scale_rows, mask=col_valid, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_valid)


def _fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
    block_n: int, block_k: int, tile: GemvTile = DEFAULT_GEMV_TILE,
) -> None:
    out_features, in_features = weight.shape
    args = (
        x,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,  # never read without HAS_BIAS
        out,
        x.stride(1),
        *weight.stride(),
        *weight_scale.stride(),
    )
    common = dict(N=out_features, K=in_features, SCALE_BLOCK_N=block_n, SCALE_BLOCK_K=block_k, HAS_BIAS=bias is not None)
    if triton.knobs.runtime.interpret:
        config = INTERPRETER_GEMV_CONFIG
        launch = {}
    else:
        # No wider than K: a load past it would only be masked.
        config = {"BLOCK_N": tile.block_n, "BLOCK_K": min(tile.block_k, triton.next_power_of_2(in_features))}
        launch = {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
    grid = (triton.cdiv(out_features, config["BLOCK_N"]),)
    _fp8_gemv_kernel[grid](*args, **common, **config, **launch)


def fp8_weight_only_gemm(
    x: torch.Tensor,  # [M, K] float32 / float16 / bfloat16
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [ceil(N / block_n), ceil(K / block_k)] float32
    bias: torch.Tensor | None,  # [N]
    block_n: int,
    block_k: int,
    gemv: bool | None = None,  # None: the GEMV kernel for up to GEMV_MAX_ROWS rows (tools compare both)
) -> torch.Tensor:
    num_tokens, in_features = x.shape
    out_features = weight.shape[0]
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    use_gemv = num_tokens <= GEMV_MAX_ROWS if gemv is None else gemv
    if use_gemv:
        if num_tokens != 1:
            raise ValueError(f"the FP8 GEMV kernel takes one row, got {num_tokens}")
        _fp8_gemv(x, weight, weight_scale, bias, out, block_n, block_k)
        return out
    common = dict(
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
    )
    args = (
        x,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,  # never read without HAS_BIAS
        out,
        num_tokens,
        min(triton.next_power_of_2(num_tokens), LARGEST_ROW_BUCKET),
        *x.stride(),
        *weight.stride(),
        *weight_scale.stride(),
        *out.stride(),
    )

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_tokens, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"])

    if triton.knobs.runtime.interpret:
        _fp8_weight_only_gemm_kernel[grid(INTERPRETER_CONFIG)](*args, **common, **INTERPRETER_CONFIG)
    else:
        _tuned_kernel[grid](*args, **common)
    return out


_tuned_kernel = triton.autotune(
    configs=_SMALL_STEP_CONFIGS + _LARGE_STEP_CONFIGS,
    key=["row_bucket", "N", "K", "SCALE_BLOCK_N", "SCALE_BLOCK_K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_fp8_weight_only_gemm_kernel)
