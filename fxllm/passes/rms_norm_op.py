"""``fxllm::rms_norm`` and ``fxllm::add_rms_norm``: a decoder's RMSNorm, alone or after the
residual add that feeds it, as one op (one kernel launch on CUDA).

The RMSNorm fusion pass puts these ops in place of ``RMSNorm`` (models/layers.py) and
of the ``hidden + branch`` before it. On CUDA a Triton kernel runs (``rms_norm_triton``);
elsewhere the torch code below runs, which restates the model's math op for op.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in fp32 and cast back before the weight, as HF does."""
    upcast = x.float()
    return weight * (upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.library.custom_op("fxllm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, hidden] -> [T, hidden], contiguous."""
    return rms_norm_reference(x, weight, eps).contiguous()


@torch.library.custom_op("fxllm::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual), both new contiguous [T, hidden] tensors."""
    summed = (x + residual).contiguous()
    return rms_norm_reference(summed, weight, eps).contiguous(), summed


@rms_norm.register_kernel("cuda")
def _(x, weight, eps):
    from fxllm.passes.rms_norm_triton import rms_norm_triton

    return rms_norm_triton(x, None, weight, eps)[0]


@add_rms_norm.register_kernel("cuda")
def _(x, residual, weight, eps):
    from fxllm.passes.rms_norm_triton import rms_norm_triton

    return rms_norm_triton(x, residual, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )
