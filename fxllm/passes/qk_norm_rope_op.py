"""``fxllm::qk_norm_rope``: per-head RMSNorm, then neox RoPE, of the query and key of one attention.

The Q/K-norm + RoPE fusion pass puts this op in place of Qwen3's ``q_norm``/``k_norm``
and ``apply_rotary`` (models/layers.py). On CUDA one Triton launch does both tensors
(``qk_norm_rope_triton``); elsewhere the torch code below runs, which restates the
model's math op for op.
"""

from __future__ import annotations

import torch

from fxllm.passes.rms_norm_op import rms_norm_reference


def norm_rope_reference(
    x: torch.Tensor,  # [T, heads, head_dim]
    weight: torch.Tensor,  # [head_dim]
    cos: torch.Tensor,  # [T, 1, head_dim]
    sin: torch.Tensor,  # [T, 1, head_dim]
    eps: float,
) -> torch.Tensor:
    """RMSNorm over head_dim (in fp32, cast back as HF does) and neox rotation, contiguous."""
    normed = rms_norm_reference(x, weight, eps)
    half = x.shape[-1] // 2
    rotated = torch.cat((-normed[..., half:], normed[..., :half]), dim=-1)
    return (normed * cos + rotated * sin).contiguous()


@torch.library.custom_op("fxllm::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    query: torch.Tensor,  # [T, num_heads, head_dim], any strides
    key: torch.Tensor,  # [T, num_kv_heads, head_dim], any strides
    query_weight: torch.Tensor,  # [head_dim]
    key_weight: torch.Tensor,  # [head_dim]
    cos: torch.Tensor,  # [T, 1, head_dim]
    sin: torch.Tensor,  # [T, 1, head_dim]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New contiguous (query, key), each normalized with its own weight and rotated."""
    return (
        norm_rope_reference(query, query_weight, cos, sin, eps),
        norm_rope_reference(key, key_weight, cos, sin, eps),
    )


@qk_norm_rope.register_kernel("cuda")
def _(query, key, query_weight, key_weight, cos, sin, eps):
    from fxllm.passes.qk_norm_rope_triton import qk_norm_rope_triton

    return qk_norm_rope_triton(query, key, query_weight, key_weight, cos, sin, eps)


@qk_norm_rope.register_fake
def _(query, key, query_weight, key_weight, cos, sin, eps):
    contiguous = torch.contiguous_format
    return torch.empty_like(query, memory_format=contiguous), torch.empty_like(key, memory_format=contiguous)
