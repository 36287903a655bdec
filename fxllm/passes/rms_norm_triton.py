"""The Triton kernel behind ``fxllm::rms_norm`` and ``fxllm::add_rms_norm`` on CUDA.

One program per token row: it loads the row (and the residual, adding them and storing
the sum), reduces the sum of squares and stores the normalized row, so the add and the
norm are one launch where Inductor compiles two (a reduction and a pointwise kernel).

Numerics follow the model run eagerly: the sum is rounded to the input dtype as
torch's add rounds it, the norm runs in fp32 on that rounded sum, and the normalized
row is rounded before the weight multiplies it (``.to(input_dtype)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A row's elements per warp before the launch takes more warps (at most MAX_WARPS).
ELEMENTS_PER_WARP = 512
MAX_WARPS = 16


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    stride_x,
    stride_residual,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=valid, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * HIDDEN + cols, x, mask=valid)
    upcast = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(upcast * upcast, axis=0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    out = weight * (upcast * rstd).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + cols, out.to(x.dtype), mask=valid)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D view whose rows are unit-stride, as the kernel indexes them."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def rms_norm_triton(
    x: torch.Tensor,  # [T, hidden]
    residual: torch.Tensor | None,  # [T, hidden], added to x first when given
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normalized, x + residual or None), new contiguous tensors."""
    if x.dim() != 2:
        raise ValueError(f"the RMSNorm kernel takes [tokens, hidden] rows, got shape {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    x = _rows(x)
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    summed = None if residual is None else torch.empty_like(out)
    if residual is not None:
        residual = _rows(residual)
    if num_tokens == 0:
        return out, summed
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x,
        x if residual is None else residual,  # unread without a residual
        weight.contiguous(),
        out,
        out if summed is None else summed,  # unwritten without a residual
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        eps,
        HIDDEN=hidden,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(MAX_WARPS, block // ELEMENTS_PER_WARP)),
    )
    return out, summed
