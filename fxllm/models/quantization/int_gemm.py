"""The integer linear ops every quantized layer calls: ``fxllm::int_weight_linear`` (INT4 /
INT8 weights, activations in the model dtype) and ``fxllm::int8_linear`` (W8A8).

Opaque custom ops, as ``fxllm::fp8_linear`` is: Dynamo sees one node per layer whatever
the device and step size, and the GEMM is chosen when the op runs (once per captured size
under CUDA graphs).

- CPU: the weight dequantized to the activation dtype, then a plain matmul (also the
  reference the GPU kernels are tested against). W8A8 checkpoints run weight-only there, as
  FP8 ones do.
- CUDA, weight-only: the Triton kernels of int_triton.py, which unpack in registers.
- CUDA, W8A8: activations quantized to int8 (per token, or the checkpoint's static scale),
  ``torch._int_mm`` (int32 accumulators), both scales applied to its result.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxllm.models.quantization.int_pack import dequantize_packed
from fxllm.utils import cdiv

INT8_MAX = 127
# torch._int_mm on CUDA takes more than 16 rows; smaller steps are padded up to this.
INT_MM_MIN_ROWS = 17
# Floor for per-token scales: an all-zero row quantizes to zeros whatever the floor.
MIN_SCALE = 1e-12
# The GPU kernels' tiles (int_triton.py): tl.dot tiles have at least 16 rows; no output tile
# is narrower than MIN_BLOCK_N; steps of up to SMALL_STEP_MAX_ROWS rows (one row tile) may
# split K, each output tile then counting its finished slices.
MIN_DOT = 16
MIN_BLOCK_N = 4
SMALL_STEP_MAX_ROWS = 16


def counters_needed(out_features: int) -> int:
    """Split-K counters a layer of ``out_features`` outputs needs: one per output tile."""
    return cdiv(SMALL_STEP_MAX_ROWS, MIN_DOT) * cdiv(out_features, MIN_BLOCK_N)


@torch.library.custom_op("fxllm::int_weight_linear", mutates_args=())
def int_weight_linear(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K / pack] int32
    scales: torch.Tensor,  # [groups, N]
    zeros: Optional[torch.Tensor],  # [groups, N] unsigned zero points as floats; None: 2 ** (bits - 1)
    input_perm: Optional[torch.Tensor],  # [K]: act-order checkpoints' input order
    bias: Optional[torch.Tensor],  # [N]
    split_counters: torch.Tensor,  # int32, zero before and after every call (the GPU kernels' split-K)
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x @ ((q - zero) * scale).T + bias`` in the activation dtype, [..., N]."""
    x2d = x.reshape(-1, x.shape[-1])
    if input_perm is not None:
        x2d = x2d.index_select(1, input_perm)
    if x.device.type == "cuda":
        from fxllm.models.quantization.int_triton import int_weight_gemm

        out = int_weight_gemm(x2d, qweight, scales, zeros, bias, split_counters, bits, group_size)
    else:
        weight = dequantize_packed(qweight.t(), scales, zeros, bits, group_size, x.dtype)
        out = F.linear(x2d, weight, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@int_weight_linear.register_fake
def _(x, qweight, scales, zeros, input_perm, bias, split_counters, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (int8 [M, K], float32 scale [M, 1]): a row's absolute maximum maps to 127."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / INT8_MAX).clamp(min=MIN_SCALE)
    return quantize_int8(x, scale), scale


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).round().clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)


def int8_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N, 1] float32
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,  # [1] float32 where activations are static
) -> torch.Tensor:
    """W8A8: int8 activations times int8 weights, int32 sums scaled per token and per channel."""
    num_tokens = x.shape[0]
    if input_scale is None:
        x_int8, x_scale = quantize_int8_per_token(x)
    else:
        x_int8, x_scale = quantize_int8(x, input_scale), input_scale.float().reshape(1, 1)
    if x.device.type == "cuda" and num_tokens < INT_MM_MIN_ROWS:
        x_int8 = F.pad(x_int8, (0, 0, 0, INT_MM_MIN_ROWS - num_tokens))
    sums = torch._int_mm(x_int8, weight.t())[:num_tokens]  # [M, N] int32
    out = (sums.float() * x_scale * weight_scale.reshape(1, -1)).to(x.dtype)
    return out + bias if bias is not None else out


def dequantize_int8(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * weight_scale.float()).to(dtype)


@torch.library.custom_op("fxllm::int8_linear", mutates_args=())
def int8_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N, 1] float32
    bias: Optional[torch.Tensor],
    input_scale: Optional[torch.Tensor],  # [1] float32: static activation scale
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        out = int8_gemm(x2d, weight, weight_scale, bias, input_scale)
    else:
        out = F.linear(x2d, dequantize_int8(weight, weight_scale, x.dtype), bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@int8_linear.register_fake
def _(x, weight, weight_scale, bias, input_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
