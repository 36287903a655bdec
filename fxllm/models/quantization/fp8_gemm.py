"""``fxllm::fp8_linear``: ``x @ dequantize(weight).T + bias``, the op every ``Fp8Linear`` calls.

One opaque custom op, so Dynamo sees one node whatever the device and step size: the
choice of GEMM below is made when the op runs (once per captured size under CUDA
graphs), never as a branch on T inside the traced graph (docs/ARCHITECTURE.md, contract 1).

The GEMMs (``Fp8Gemm``):
- DEQUANTIZE: the weight rounded to the activation dtype, then a plain matmul. CPU,
  GPUs without FP8, and the reference the others are tested against.
- WEIGHT_ONLY: a Triton GEMM that dequantizes weight tiles in registers
  (``fp8_triton.py``): one byte read per weight, for small memory-bound steps; also
  every step of block-scaled and weight-only (W8A16) checkpoints.
- W8A8: activations quantized to FP8 (per token, or the checkpoint's static scale) and
  ``torch._scaled_mm`` with row-wise scales: FP8 tensor cores for large steps.

CI tests the Triton kernel under TRITON_INTERPRET=1 and W8A8 through ``_scaled_mm``'s CPU
implementation; tests/test_fp8_gpu.py runs both on an FP8 GPU.
"""

from __future__ import annotations

import enum
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fxllm.models.quantization.fp8_quant import dequantize, quantize_per_token, quantize_with_scale
from fxllm.models.quantization.scheme import ActivationScheme

# Steps of at most this many tokens use WEIGHT_ONLY, larger ones W8A8: where W8A8's
# activation-quantize pass and FP8 tensor cores start to beat reading the weights once.
# tools/bench_fp8_gemm.py on the Llama-3-8B layers (H200): a decoder layer's four GEMMs
# take 102 µs weight-only vs 202 µs W8A8 at 16 rows, 246 vs 204 µs at 64.
WEIGHT_ONLY_MAX_TOKENS = 16
# torch._scaled_mm needs both dimensions of the weight to be multiples of 16.
SCALED_MM_ALIGNMENT = 16
# FP8 conversions and tensor cores exist from Ada / Hopper (sm89) on.
MIN_FP8_CAPABILITY = (8, 9)


class Fp8Gemm(enum.Enum):
    DEQUANTIZE = "dequantize"
    WEIGHT_ONLY = "weight_only"
    W8A8 = "w8a8"


def select_fp8_gemm(
    fp8_gpu: bool,
    num_tokens: int,
    weight_shape: tuple[int, int],
    scale_block: tuple[int, int],
    activation_scheme: ActivationScheme,
) -> Fp8Gemm:
    """The GEMM for a step of ``num_tokens`` rows through a [out, in] FP8 weight whose scales
    cover (block_n, block_k) tiles; ``fp8_gpu``: the activations are on a CUDA device with FP8."""
    if not fp8_gpu:
        return Fp8Gemm.DEQUANTIZE
    out_features, in_features = weight_shape
    row_wise = scale_block[0] == 1 and scale_block[1] >= in_features
    aligned = out_features % SCALED_MM_ALIGNMENT == 0 and in_features % SCALED_MM_ALIGNMENT == 0
    if activation_scheme is ActivationScheme.NONE or num_tokens <= WEIGHT_ONLY_MAX_TOKENS or not (row_wise and aligned):
        return Fp8Gemm.WEIGHT_ONLY
    return Fp8Gemm.W8A8


@functools.lru_cache(maxsize=None)  # asked on every call of the op; a device's answer never changes
def has_fp8_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_FP8_CAPABILITY


def dequantize_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [ceil(N / block_n), ceil(K / block_k)] float32
    bias: torch.Tensor | None,  # [N]
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    return F.linear(x, dequantize(weight, weight_scale, block_n, block_k, x.dtype), bias)


def w8a8_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N, 1] float32
    bias: torch.Tensor | None,  # [N]
    input_scale: torch.Tensor | None,  # [1] float32 where activations are static
) -> torch.Tensor:
    num_tokens = x.shape[0]
    if input_scale is None:
        x_fp8, x_scale = quantize_per_token(x)  # [M, K], [M, 1]
    else:
        x_fp8 = quantize_with_scale(x, input_scale)
        x_scale = input_scale.float().reshape(1, 1).expand(num_tokens, 1).contiguous()
    # Row-wise scaling writes only bfloat16 on some builds (the CUTLASS path): cast after.
    out = torch._scaled_mm(
        x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1), out_dtype=torch.bfloat16
    )
    out = out.to(x.dtype)
    return out + bias if bias is not None else out


@torch.library.custom_op("fxllm::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [ceil(N / block_n), ceil(K / block_k)] float32
    bias: Optional[torch.Tensor],  # [N], activation dtype
    input_scale: Optional[torch.Tensor],  # [1] float32: static activation scale
    block_n: int,
    block_k: int,
    activation_scheme: str,
) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` in the activation dtype, [..., N]."""
    x2d = x.reshape(-1, x.shape[-1])
    activations = ActivationScheme(activation_scheme)
    gemm = select_fp8_gemm(has_fp8_gpu(x.device), x2d.shape[0], tuple(weight.shape), (block_n, block_k), activations)
    if gemm is Fp8Gemm.W8A8:
        out = w8a8_gemm(x2d, weight, weight_scale, bias, input_scale)
    elif gemm is Fp8Gemm.WEIGHT_ONLY:
        from fxllm.models.quantization.fp8_triton import fp8_weight_only_gemm

        out = fp8_weight_only_gemm(x2d, weight, weight_scale, bias, block_n, block_k)
    else:
        out = dequantize_gemm(x2d, weight, weight_scale, bias, block_n, block_k)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@fp8_linear.register_fake
def _(x, weight, weight_scale, bias, input_scale, block_n, block_k, activation_scheme):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
